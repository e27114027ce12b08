// dlopen side of the CUDA backend (compiled into sae_core; links only libdl).
#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/cuda/cuda_backend.h"

namespace sae {
namespace {

constexpr char kLibName[] = "libsae_cuda.so";

std::string ExecutableDir() {
  std::vector<char> buf(4096);
  const ssize_t n = readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  if (n <= 0) return "";
  std::string path(buf.data(), static_cast<size_t>(n));
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "" : path.substr(0, slash);
}

struct Loaded {
  SaeCudaBackendCreateFn create = nullptr;
  std::string error;  // why nothing was loaded
};

// The library stays loaded for the life of the process: tensors it created
// hold release callbacks that live in its code.
const Loaded& LoadOnce() {
  static Loaded* loaded = [] {
    auto* l = new Loaded();
    std::vector<std::string> candidates;
    if (const char* env = std::getenv("SAE_CUDA_BACKEND_LIB"); env != nullptr && env[0] != '\0') {
      candidates.push_back(env);
    } else {
      const std::string exe_dir = ExecutableDir();
      if (!exe_dir.empty()) {
        candidates.push_back(absl::StrCat(exe_dir, "/", kLibName));
        candidates.push_back(absl::StrCat(exe_dir, "/../lib/", kLibName));
      }
#ifdef SAE_CUDA_BACKEND_BUILD_PATH
      candidates.push_back(SAE_CUDA_BACKEND_BUILD_PATH);
#endif
      candidates.push_back(kLibName);  // LD_LIBRARY_PATH, rpath, ld.so.cache
    }
    std::vector<std::string> failures;
    for (const std::string& path : candidates) {
      // A bare name goes to the dynamic linker's search; a path must exist.
      if (path.find('/') != std::string::npos && access(path.c_str(), F_OK) != 0) {
        failures.push_back(absl::StrCat(path, ": not found"));
        continue;
      }
      void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (handle == nullptr) {
        const char* why = dlerror();
        failures.push_back(why != nullptr ? std::string(why) : absl::StrCat(path, ": dlopen failed"));
        continue;
      }
      void* sym = dlsym(handle, "SaeCudaBackendCreate");
      if (sym == nullptr) {
        failures.push_back(absl::StrCat(path, ": no symbol SaeCudaBackendCreate"));
        dlclose(handle);
        continue;
      }
      l->create = reinterpret_cast<SaeCudaBackendCreateFn>(sym);
      return l;
    }
    l->error = absl::StrCat("backend \"cuda\": cannot load ", kLibName,
                            " (set SAE_CUDA_BACKEND_LIB to its path); tried: ", absl::StrJoin(failures, "; "));
    return l;
  }();
  return *loaded;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend() {
  const Loaded& l = LoadOnce();
  if (l.create == nullptr) return absl::FailedPreconditionError(l.error);
  char err[1024] = {0};
  Backend* backend = nullptr;
  const int code = l.create(SAE_CUDA_BACKEND_ABI_VERSION, &backend, err, sizeof(err));
  if (code != 0 || backend == nullptr) {
    const auto status_code = code == 0 ? absl::StatusCode::kInternal : static_cast<absl::StatusCode>(code);
    return absl::Status(status_code, absl::StrCat("backend \"cuda\": ", err));
  }
  return std::unique_ptr<Backend>(backend);
}

}  // namespace sae
