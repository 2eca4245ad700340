// The state machine of one sharded unit (FSDP2's ShardedState, with the in-flight all-gather made explicit).
//
//   kSharded --StartUnshard--> kUnsharding --WaitUnshard--> kUnsharded --Reshard--> kSharded
//
// Reduction of gradients runs beside it: kIdle --StartReduce--> kReducing --WaitReduce--> kIdle.
#pragma once

namespace tessera::shard {

enum class UnitState { kSharded, kUnsharding, kUnsharded };
enum class ReduceState { kIdle, kReducing };

inline const char* UnitStateName(UnitState s) {
  switch (s) {
    case UnitState::kSharded: return "sharded";
    case UnitState::kUnsharding: return "unsharding";
    case UnitState::kUnsharded: return "unsharded";
  }
  return "unknown";
}

}  // namespace tessera::shard
