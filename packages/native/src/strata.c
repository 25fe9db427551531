// The system calls strata needs and Node does not expose. Each function takes plain numbers (descriptors) and
// returns plain values or throws an Error whose `code` is the errno name, as Node's own fs errors do.
#define _GNU_SOURCE
#include <errno.h>
#include <node_api.h>
#include <stdio.h>
#include <string.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

// The FUSE device's backing-file ioctls (linux/fuse.h of 6.9+, protocol 7.40), defined here so the addon builds
// against older headers too; the kernel says ENOTTY when it lacks them.
struct strata_fuse_backing_map {
  int32_t fd;
  uint32_t flags;
  uint64_t padding;
};
#define STRATA_FUSE_DEV_IOC_MAGIC 229
#define STRATA_FUSE_DEV_IOC_BACKING_OPEN _IOW(STRATA_FUSE_DEV_IOC_MAGIC, 1, struct strata_fuse_backing_map)
#define STRATA_FUSE_DEV_IOC_BACKING_CLOSE _IOW(STRATA_FUSE_DEV_IOC_MAGIC, 2, uint32_t)

static napi_value throw_errno(napi_env env, const char *what) {
  int err = errno;
  const char *code = "EIO";
  switch (err) {
    case EBADF: code = "EBADF"; break;
    case ENOTSOCK: code = "ENOTSOCK"; break;
    case EINVAL: code = "EINVAL"; break;
    case ENOTCONN: code = "ENOTCONN"; break;
    case EPERM: code = "EPERM"; break;
    case ENOTTY: code = "ENOTTY"; break;
    case ESRCH: code = "ESRCH"; break;
    case ENOSYS: code = "ENOSYS"; break;
    case EMFILE: code = "EMFILE"; break;
    case ELOOP: code = "ELOOP"; break;
    case EOPNOTSUPP: code = "EOPNOTSUPP"; break;
    case ENOENT: code = "ENOENT"; break;
    case EACCES: code = "EACCES"; break;
  }
  char message[256];
  snprintf(message, sizeof message, "%s: %s", what, strerror(err));
  napi_throw_error(env, code, message);
  return NULL;
}

static int int_arg(napi_env env, napi_callback_info info, size_t n, int32_t *out) {
  size_t argc = 4;
  napi_value argv[4];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < n) {
    napi_throw_type_error(env, NULL, "missing argument");
    return 0;
  }
  for (size_t i = 0; i < n; i++) {
    if (napi_get_value_int32(env, argv[i], &out[i]) != napi_ok) {
      napi_throw_type_error(env, NULL, "arguments must be integers");
      return 0;
    }
  }
  return 1;
}

static void set_number(napi_env env, napi_value obj, const char *key, double v) {
  napi_value n;
  napi_create_double(env, v, &n);
  napi_set_named_property(env, obj, key, n);
}

// peerCredentials(fd) -> { pid, uid, gid } of the process that connected the Unix socket `fd` (SO_PEERCRED:
// taken by the kernel at connect time, so a client cannot claim another identity).
static napi_value peer_credentials(napi_env env, napi_callback_info info) {
  int32_t fd;
  if (!int_arg(env, info, 1, &fd)) return NULL;
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return throw_errno(env, "getsockopt(SO_PEERCRED)");
  napi_value obj;
  napi_create_object(env, &obj);
  set_number(env, obj, "pid", cred.pid);
  set_number(env, obj, "uid", cred.uid);
  set_number(env, obj, "gid", cred.gid);
  return obj;
}

// pidfdGetfd(pid, fd) -> a new descriptor (close-on-exec) in this process for the open file description that is
// `fd` in process `pid`: the same file, offset and state, e.g. the same FUSE connection of a /dev/fuse
// descriptor, which opening /proc/PID/fd/N would not give. Needs the right to ptrace `pid` (root).
static napi_value pidfd_getfd(napi_env env, napi_callback_info info) {
  int32_t a[2];
  if (!int_arg(env, info, 2, a)) return NULL;
  int pidfd = (int)syscall(SYS_pidfd_open, (pid_t)a[0], 0);
  if (pidfd < 0) return throw_errno(env, "pidfd_open");
  int fd = (int)syscall(SYS_pidfd_getfd, pidfd, a[1], 0);
  int err = errno;
  close(pidfd);
  if (fd < 0) {
    errno = err;
    return throw_errno(env, "pidfd_getfd");
  }
  napi_value out;
  napi_create_int32(env, fd, &out);
  return out;
}

// backingOpen(fuseFd, fileFd) -> the backing id the FUSE connection of `fuseFd` gives `fileFd` (an open file it
// may then pass reads through to: FOPEN_PASSTHROUGH). The connection keeps its own reference to the file.
static napi_value backing_open(napi_env env, napi_callback_info info) {
  int32_t a[2];
  if (!int_arg(env, info, 2, a)) return NULL;
  struct strata_fuse_backing_map map = {.fd = a[1], .flags = 0, .padding = 0};
  int id = ioctl(a[0], STRATA_FUSE_DEV_IOC_BACKING_OPEN, &map);
  if (id < 0) return throw_errno(env, "ioctl(FUSE_DEV_IOC_BACKING_OPEN)");
  napi_value out;
  napi_create_int32(env, id, &out);
  return out;
}

// backingClose(fuseFd, id): the connection lets go of backing id `id` (files opened with it keep the file).
static napi_value backing_close(napi_env env, napi_callback_info info) {
  int32_t a[2];
  if (!int_arg(env, info, 2, a)) return NULL;
  uint32_t id = (uint32_t)a[1];
  if (ioctl(a[0], STRATA_FUSE_DEV_IOC_BACKING_CLOSE, &id) < 0) return throw_errno(env, "ioctl(FUSE_DEV_IOC_BACKING_CLOSE)");
  return NULL;
}

static void export_fn(napi_env env, napi_value exports, const char *name, napi_callback cb) {
  napi_value fn;
  napi_create_function(env, name, NAPI_AUTO_LENGTH, cb, NULL, &fn);
  napi_set_named_property(env, exports, name, fn);
}

NAPI_MODULE_INIT() {
  export_fn(env, exports, "peerCredentials", peer_credentials);
  export_fn(env, exports, "pidfdGetfd", pidfd_getfd);
  export_fn(env, exports, "backingOpen", backing_open);
  export_fn(env, exports, "backingClose", backing_close);
  return exports;
}
