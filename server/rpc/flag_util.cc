#include "rpc/flag_util.h"

#include <algorithm>
#include <filesystem>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace sae {

namespace {

// "--dump-hooks=x" -> "--dump_hooks=x"; values are untouched.
std::string NormalizeFlagName(const std::string& arg) {
  if (arg.size() < 2 || arg[0] != '-' || arg == "-") return arg;
  const size_t start = arg.find_first_not_of('-');
  if (start == std::string::npos) return arg;
  const size_t end = std::min(arg.find('='), arg.size());
  std::string out = arg;
  for (size_t i = start; i < end; ++i) {
    if (out[i] == '-') out[i] = '_';
  }
  return out;
}

}  // namespace

bool AbslParseFlag(absl::string_view text, RepeatedFlag* flag, std::string* /*error*/) {
  flag->values.clear();
  if (!text.empty()) flag->values = absl::StrSplit(text, kRepeatedFlagSeparator);
  return true;
}

std::string AbslUnparseFlag(const RepeatedFlag& flag) {
  return absl::StrJoin(flag.values, std::string(1, kRepeatedFlagSeparator));
}

SaeSpec ParseSaeSpec(const std::string& spec) {
  const size_t eq = spec.find('=');
  std::error_code ec;
  if (eq == std::string::npos || spec.find('/') < eq || std::filesystem::is_directory(spec, ec)) return {spec, ""};
  return {spec.substr(eq + 1), spec.substr(0, eq)};
}

std::vector<std::string> PrepareArgs(int argc, char** argv, const std::vector<std::string>& names) {
  std::vector<std::string> out;
  std::map<std::string, std::vector<std::string>> values;
  std::map<std::string, size_t> slot;  // where the merged flag goes: its first occurrence
  bool passthrough = false;
  for (int i = 0; i < argc; ++i) {
    if (i == 0 || passthrough) {
      out.push_back(argv[i]);
      continue;
    }
    const std::string arg = NormalizeFlagName(argv[i]);
    if (arg == "--") {
      passthrough = true;
      out.push_back(arg);
      continue;
    }
    bool matched = false;
    for (const std::string& name : names) {
      for (const std::string& prefix : {"--" + name, "-" + name}) {
        std::string value;
        if (absl::StartsWith(arg, prefix + "=")) {
          value = arg.substr(prefix.size() + 1);
        } else if (arg == prefix && i + 1 < argc) {
          value = argv[++i];
        } else {
          continue;
        }
        if (!slot.count(name)) {
          slot[name] = out.size();
          out.emplace_back();
        }
        values[name].push_back(value);
        matched = true;
        break;
      }
      if (matched) break;
    }
    if (!matched) out.push_back(arg);
  }
  for (const auto& [name, index] : slot) {
    out[index] = "--" + name + "=" + absl::StrJoin(values[name], std::string(1, kRepeatedFlagSeparator));
  }
  return out;
}

std::vector<char*> ToArgv(std::vector<std::string>& args) {
  std::vector<char*> argv;
  argv.reserve(args.size() + 1);
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  return argv;
}

}  // namespace sae
