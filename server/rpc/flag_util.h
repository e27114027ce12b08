// Command-line helpers shared by sae-server and sae-extract.
#ifndef SAE_RPC_FLAG_UTIL_H_
#define SAE_RPC_FLAG_UTIL_H_

#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "core/engine.h"

namespace sae {

// A flag that may be given several times: its values in order, each whole
// (absl's std::vector<std::string> flags split values at commas, which broke
// a path with a comma into two). PrepareArgs folds the occurrences into one
// value separated by kRepeatedFlagSeparator.
struct RepeatedFlag {
  std::vector<std::string> values;
};
inline constexpr char kRepeatedFlagSeparator = '\x1f';  // ASCII unit separator
bool AbslParseFlag(absl::string_view text, RepeatedFlag* flag, std::string* error);
std::string AbslUnparseFlag(const RepeatedFlag& flag);

// An --sae value, "DIR" or "ALIAS=DIR". It is a DIR with '=' in it when it
// names an existing directory or a '/' comes before its first '=' (an alias
// is a name, not a path).
SaeSpec ParseSaeSpec(const std::string& spec);

// Rewrites argv for absl::ParseCommandLine:
//  - dashes in flag names become underscores (`--dump-hooks` = `--dump_hooks`),
//    since absl flag names cannot contain dashes;
//  - absl keeps only the last value of a flag given twice, so every
//    `--name=V` / `--name V` of the `repeated` flags (RepeatedFlag) is folded
//    into one: `--sae A --sae B` gives {A, B}.
// Arguments after "--" are left alone.
std::vector<std::string> PrepareArgs(int argc, char** argv, const std::vector<std::string>& repeated);

// argv-style pointers into `args` (valid while `args` lives), null-terminated.
std::vector<char*> ToArgv(std::vector<std::string>& args);

}  // namespace sae

#endif  // SAE_RPC_FLAG_UTIL_H_
