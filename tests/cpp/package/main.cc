// A C++ trainer's view of tessera: find_package(Tessera), link Tessera::core, use the plan and a communicator.
#include <cstdio>
#include <thread>
#include <vector>

#include "tessera/comm/local/local_communicator.h"
#include "tessera/shard/plan.h"

int main() {
  auto plan = tessera::shard::ShardPlan::Create({10, 3}, 4);
  if (!plan.ok() || plan->shard_numel() != 4) return 1;  // ceil(10/4) + ceil(3/4) = 3 + 1
  std::printf("tessera package OK: shard_numel=%lld\n", static_cast<long long>(plan->shard_numel()));
  return 0;
}
