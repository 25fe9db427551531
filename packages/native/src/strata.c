// The system calls strata needs and Node does not expose. Each function takes plain numbers (descriptors) and
// returns plain values or throws an Error whose `code` is the errno name, as Node's own fs errors do.
#define _GNU_SOURCE
#include <errno.h>
#include <node_api.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

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

NAPI_MODULE_INIT() {
  napi_value fn;
  napi_create_function(env, "peerCredentials", NAPI_AUTO_LENGTH, peer_credentials, NULL, &fn);
  napi_set_named_property(env, exports, "peerCredentials", fn);
  return exports;
}
