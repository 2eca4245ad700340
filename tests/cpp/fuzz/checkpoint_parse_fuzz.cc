// libFuzzer target for everything that parses checkpoint bytes read from disk: the manifest, a rank index and the
// data file header. Built and run by scripts/fuzz.sh (clang, -fsanitize=fuzzer,address,undefined), not by CMake.
// Besides "never crashes, hangs or leaks", it checks that whatever parses survives a serialize/parse round trip.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "tessera/checkpoint/format.h"
#include "tessera/core/status.h"

using namespace tessera::checkpoint;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);

  absl::StatusOr<Manifest> m = ParseManifest(text, "fuzz/manifest.json");
  if (m.ok()) {
    absl::StatusOr<Manifest> again = ParseManifest(SerializeManifest(*m), "round trip");
    TESSERA_CHECK(again.ok(), "a parsed manifest must re-parse: ", again.status().ToString());
    TESSERA_CHECK(SerializeManifest(*again) == SerializeManifest(*m), "manifest round trip is not stable");
  } else {
    TESSERA_CHECK(absl::IsDataLoss(m.status()), m.status().ToString());
  }

  absl::StatusOr<RankIndex> r = ParseRankIndex(text, "fuzz/rank-00000.json");
  if (r.ok()) {
    absl::StatusOr<RankIndex> again = ParseRankIndex(SerializeRankIndex(*r), "round trip");
    TESSERA_CHECK(again.ok(), "a parsed rank index must re-parse: ", again.status().ToString());
    if (r->world_size == 1) {
      absl::StatusOr<Manifest> merged = MergeRankIndexes({*r});
      if (merged.ok()) TESSERA_CHECK(ParseManifest(SerializeManifest(*merged)).ok(), "merged manifest must parse");
    }
  } else {
    TESSERA_CHECK(absl::IsDataLoss(r.status()), r.status().ToString());
  }

  absl::StatusOr<FileHeader> h = ParseFileHeader(absl::MakeConstSpan(data, size));
  if (h.ok()) {
    const std::string enc = EncodeFileHeader(*h);
    TESSERA_CHECK(enc.compare(0, enc.size(), text.substr(0, enc.size())) == 0, "header round trip differs");
  }
  return 0;
}
