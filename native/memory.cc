// STUB: replaced by the real implementation.
#include "addon.h"
namespace ferry {
void InitMemory(Napi::Env, Napi::Object) {}
}
