#include "common/file.h"

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace sae {

absl::Status OpenInputFile(const std::string& path, std::ifstream* in) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": is a directory, not a file"));
  }
  errno = 0;
  in->open(path, std::ios::binary);
  if (!in->is_open()) {
    return absl::NotFoundError(
        absl::StrCat(path, ": cannot open", errno != 0 ? ": " : "", errno != 0 ? std::strerror(errno) : ""));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  std::ifstream in;
  if (absl::Status opened = OpenInputFile(path, &in); !opened.ok()) return opened;
  std::ostringstream contents;
  contents << in.rdbuf();
  // An empty file sets failbit on the copy; only badbit means the read failed.
  if (in.bad() || contents.bad()) return absl::DataLossError(absl::StrCat(path, ": read error"));
  return contents.str();
}

}  // namespace sae
