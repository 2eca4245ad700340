# Sourced by scripts/check_cmake_package.sh and scripts/build_cpp_trainer.sh.
# check_no_baked_paths TREE PATH...: fails naming the files of an installed tree that mention any PATH (the
# configure-time prefix, the directory it was installed into before a move, the build tree): such a file would
# break when the tree is installed elsewhere, moved or copied (issue 17).
check_no_baked_paths() {
  local tree=$1 found
  shift
  local patterns=()
  for p in "$@"; do patterns+=(-e "$p"); done
  found=$(grep -rlF "${patterns[@]}" "$tree" || true)
  if [[ -n "$found" ]]; then
    echo "relocation check: these installed files name a path of the build or install step ($*):" >&2
    for f in $found; do
      echo "  $f:" >&2
      grep -aoF "${patterns[@]}" "$f" | sort -u | sed 's/^/    /' >&2
    done
    echo "an installed package must find everything relative to itself (see cmake/TesseraConfig.cmake.in)" >&2
    return 1
  fi
}
