// STUB: replaced by the real implementation.
#include "addon.h"
namespace ferry {
void InitVcpu(Napi::Env, Napi::Object) {}
}
