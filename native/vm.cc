// STUB: replaced by the real implementation.
#include "addon.h"
namespace ferry {
void InitVm(Napi::Env, Napi::Object) {}
}
