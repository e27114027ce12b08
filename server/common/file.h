// Reading input files with errors that name them. std::ifstream alone opens a
// directory without complaint and then reads nothing, which turned a path
// to a directory into an empty config (or input) instead of an error.
#ifndef SAE_COMMON_FILE_H_
#define SAE_COMMON_FILE_H_

#include <fstream>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sae {

// Opens `path` for binary reading. NOT_FOUND when it cannot be opened,
// INVALID_ARGUMENT when it is a directory; the message starts with the path.
absl::Status OpenInputFile(const std::string& path, std::ifstream* in);

// The whole contents of `path` (errors as OpenInputFile, and DATA_LOSS when
// reading fails part way).
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

}  // namespace sae

#endif  // SAE_COMMON_FILE_H_
