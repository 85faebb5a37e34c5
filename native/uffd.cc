// STUB: replaced by the real implementation.
#include "addon.h"
namespace ferry {
void InitUffd(Napi::Env, Napi::Object) {}
}
