// STUB: replaced by the real implementation.
#include "addon.h"
namespace ferry {
void InitKvm(Napi::Env, Napi::Object) {}
}
