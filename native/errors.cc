// STUB: replaced by the real implementation.
#include "addon.h"
namespace ferry {
void InitErrors(Napi::Env, Napi::Object) {}
}
