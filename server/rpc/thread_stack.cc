// Linked into sae-server (an OBJECT library, so the symbol always lands in
// the executable): every thread stack asked for below 1 MiB is raised to
// 1 MiB. civetweb (prometheus-cpp's HTTP server) asks for ~100 KiB; glibc
// takes the static TLS block out of the requested stack, and with a library
// that has a large static TLS block loaded (libcublasLt), thread creation
// then fails with EINVAL and the metrics endpoint silently stops answering.
// The executable's definition interposes on libc's for every shared library.
#include <dlfcn.h>
#include <pthread.h>

#include <cstddef>

namespace {

constexpr size_t kMinThreadStack = size_t{1} << 20;

using SetStackSizeFn = int (*)(pthread_attr_t*, size_t);

SetStackSizeFn RealSetStackSize() {
  static const SetStackSizeFn real = reinterpret_cast<SetStackSizeFn>(dlsym(RTLD_NEXT, "pthread_attr_setstacksize"));
  return real;
}

}  // namespace

extern "C" int pthread_attr_setstacksize(pthread_attr_t* attr, size_t stack_size) {
  return RealSetStackSize()(attr, stack_size < kMinThreadStack ? kMinThreadStack : stack_size);
}
