/* cni-ipam: the launcher, installed as the plugin's executable (the bundle's `cni-ipam`).
 *
 * A CNI exec (CNI_COMMAND set and not empty) is handed to the node's exec server
 * (cni_ipam/execserver.py, which describes the protocol) when one of THIS build is listening and
 * accepts it (it refuses an exec whose config names paths it cannot see);
 * everything else -- the CLI, no server, another build, any failure before the server accepted
 * -- execs the Python bundle next to this file (`cni-ipam-python`) with the same argv and
 * environment, exactly as if the launcher were not there.
 *
 * The socket is /run/cni-ipam/exec.sock, or $CNI_IPAM_EXEC_SOCKET (empty: never use a server).
 * BUILD_ID is defined by packaging/build.py (the server compares it with its own). */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef BUILD_ID
#define BUILD_ID "unknown"
#endif
#define MAGIC "cni-ipam-exec/1"
#define DEFAULT_SOCKET "/run/cni-ipam/exec.sock"
#define BUNDLE_EXE "cni-ipam-python"
#define ACCEPT_TIMEOUT_S 10   /* no "A" by then: exec the bundle (the server's child then runs nothing) */
#define MAX_MESSAGE (1 << 20)

extern char **environ;

static int cni_mode(void) {
    const char *c = getenv("CNI_COMMAND");
    return c != NULL && c[0] != '\0';
}

/* The answer of a CNI exec that cannot go on: the spec's error JSON on stdout, non-zero exit. */
static void cni_fail(int code, const char *msg) {
    if (cni_mode())
        printf("{\"cniVersion\": \"1.0.0\", \"code\": %d, \"msg\": \"cni-ipam: %s\"}\n", code, msg);
    else
        fprintf(stderr, "cni-ipam: error: %s\n", msg);
    fflush(stdout);
    _exit(1);
}

/* The exec's stdin, read whole into a memory file (a CNI runtime writes the config and closes
 * it): the server's child reads the config from it BEFORE it accepts (it refuses an exec whose
 * paths it does not see), and a refused exec passes it on, from the start, to the bundle. */
static int stdin_copy = -1;

static void copy_stdin(void) {
    int fd = memfd_create("cni-ipam-stdin", MFD_CLOEXEC);
    if (fd < 0)
        return;
    static char chunk[65536];
    for (;;) {
        ssize_t n = read(0, chunk, sizeof chunk);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;     /* what could be read is what the plugin would have read */
        }
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(fd, chunk + off, n - off);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                cni_fail(999, "cannot keep the network configuration read from stdin (memfd write)");
            }
            off += w;
        }
    }
    stdin_copy = fd;
}

static void exec_bundle(char **argv) {
    if (stdin_copy >= 0) {      /* stdin was read: the bundle gets the copy, from its start */
        if (lseek(stdin_copy, 0, SEEK_SET) != 0 || dup2(stdin_copy, 0) != 0)
            cni_fail(999, "cannot pass stdin on to the plugin");
        close(stdin_copy);
        stdin_copy = -1;
    }
    char path[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", path, sizeof path - sizeof BUNDLE_EXE - 1);
    if (n <= 0)
        cni_fail(999, "cannot find the launcher's own path (/proc/self/exe)");
    path[n] = '\0';
    char *slash = strrchr(path, '/');
    if (slash == NULL)
        cni_fail(999, "cannot find the launcher's own directory");
    strcpy(slash + 1, BUNDLE_EXE);
    execv(path, argv);
    char msg[PATH_MAX + 64];
    snprintf(msg, sizeof msg, "cannot run %s: %s", path, strerror(errno));
    cni_fail(999, msg);
}

struct buf { char *p; size_t len, cap; int ok; };

static void put(struct buf *b, const char *s) {
    size_t n = strlen(s) + 1;   /* with its NUL */
    if (!b->ok || b->len + n > b->cap) { b->ok = 0; return; }
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

/* Hand the exec to the server; returns only if it was not accepted (nothing ran). */
static void try_server(int argc, char **argv) {
    const char *path = getenv("CNI_IPAM_EXEC_SOCKET");
    if (path == NULL)
        path = DEFAULT_SOCKET;
    if (path[0] == '\0' || strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path))
        return;
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (s < 0)
        return;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strcpy(addr.sun_path, path);
    if (connect(s, (struct sockaddr *)&addr, sizeof addr) != 0) {
        close(s);
        return;
    }
    copy_stdin();
    if (stdin_copy < 0) {
        close(s);
        return;
    }
    static char data[MAX_MESSAGE];
    struct buf b = {data, 0, sizeof data, 1};
    char num[32], cwd[PATH_MAX];
    mode_t mask = umask(0);
    umask(mask);
    put(&b, MAGIC);
    put(&b, BUILD_ID);
    snprintf(num, sizeof num, "%o", (unsigned)mask);
    put(&b, num);
    put(&b, getcwd(cwd, sizeof cwd) ? cwd : "/");
    snprintf(num, sizeof num, "%d", argc);
    put(&b, num);
    for (int i = 0; i < argc; i++)
        put(&b, argv[i]);
    int envc = 0;
    for (char **e = environ; *e; e++)
        envc++;
    snprintf(num, sizeof num, "%d", envc);
    put(&b, num);
    for (char **e = environ; *e; e++)
        put(&b, *e);
    if (!b.ok) {
        close(s);
        return;
    }
    int fds[3] = {stdin_copy, 1, 2};
    char control[CMSG_SPACE(sizeof fds)];
    memset(control, 0, sizeof control);
    struct iovec iov = {data, b.len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                         .msg_controllen = sizeof control};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(c), fds, sizeof fds);
    if (sendmsg(s, &msg, MSG_NOSIGNAL) != (ssize_t)b.len) {
        close(s);
        return;
    }
    struct timeval tv = {ACCEPT_TIMEOUT_S, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char reply[256];
    ssize_t n = recv(s, reply, sizeof reply, 0);
    if (n < 1 || reply[0] != 'A') {     /* refused, closed, timed out: nothing ran */
        close(s);
        return;
    }
    if (send(s, "G", 1, MSG_NOSIGNAL) != 1) {
        close(s);                       /* the child sees no "G" and runs nothing */
        return;
    }
    /* From here the verb runs in the server's child: wait for its exit code. */
    struct timeval none = {0, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none);
    do
        n = recv(s, reply, sizeof reply, 0);
    while (n < 0 && errno == EINTR);
    if (n == 5 && reply[0] == 'S') {
        int code;
        memcpy(&code, reply + 1, 4);    /* little-endian, as every Linux this runs on */
        _exit(code & 0xff);
    }
    cni_fail(11, "the exec server's process ended without an answer (try again)");
}

int main(int argc, char **argv) {
    if (cni_mode())
        try_server(argc, argv);
    exec_bundle(argv);
    return 1;
}
