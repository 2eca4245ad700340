// Element access per dtype for reductions computed on the host (comm/local, comm/gloo): values are loaded into Acc
// (float for the 16-bit types, as NCCL accumulates them), reduced there, and rounded to the storage type once.
#pragma once

#include <cstdint>

#include "tessera/core/dtype.h"

namespace tessera::elements {

struct F32 {
  using Storage = float;
  using Acc = float;
  static Acc Load(Storage v) { return v; }
  static Storage Store(Acc a) { return a; }
};
struct F64 {
  using Storage = double;
  using Acc = double;
  static Acc Load(Storage v) { return v; }
  static Storage Store(Acc a) { return a; }
};
struct BF16 {
  using Storage = uint16_t;
  using Acc = float;
  static Acc Load(Storage v) { return BF16ToFloat(v); }
  static Storage Store(Acc a) { return FloatToBF16(a); }
};
struct F16 {
  using Storage = uint16_t;
  using Acc = float;
  static Acc Load(Storage v) { return HalfToFloat(v); }
  static Storage Store(Acc a) { return FloatToHalf(a); }
};

}  // namespace tessera::elements
