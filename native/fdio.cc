// STUB: replaced by the real implementation.
#include "addon.h"
namespace ferry {
void InitFdio(Napi::Env, Napi::Object) {}
}
