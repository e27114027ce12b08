// Command-line helpers shared by sae-server and sae-extract.
#ifndef SAE_RPC_FLAG_UTIL_H_
#define SAE_RPC_FLAG_UTIL_H_

#include <string>
#include <vector>

namespace sae {

// Rewrites argv for absl::ParseCommandLine:
//  - dashes in flag names become underscores (`--dump-hooks` = `--dump_hooks`),
//    since absl flag names cannot contain dashes;
//  - absl keeps only the last value of a flag given twice, so every
//    `--name=V` / `--name V` of the `repeated` flags is folded into one
//    `--name=V1,V2,...`: `--sae A --sae B` fills a std::vector<std::string>
//    flag with {A, B}.
// Arguments after "--" are left alone.
std::vector<std::string> PrepareArgs(int argc, char** argv, const std::vector<std::string>& repeated);

// argv-style pointers into `args` (valid while `args` lives), null-terminated.
std::vector<char*> ToArgv(std::vector<std::string>& args);

}  // namespace sae

#endif  // SAE_RPC_FLAG_UTIL_H_
