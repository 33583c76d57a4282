/* Bench processor, a compiled twin of processor.php with almost no CPU of its own: it shows
 * what the consumers overlap when the legacy script's interpreter start-up (php-cli, ~15-20 ms
 * of CPU) does not fill the machine's cores.
 *   processor STORE SLEEP_MS TIMES_FILE
 * Reads the whole mail from stdin, sleeps SLEEP_MS, appends one line to TIMES_FILE:
 *   <delivery id> <start epoch s> <end epoch s> <stdin bytes>
 * bench/load.py builds it with the system's C compiler when there is one. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    double t0 = now();
    static char buf[65536];
    long long bytes = 0;
    ssize_t n;
    while ((n = read(0, buf, sizeof buf)) > 0) {
        bytes += n;
    }
    long ms = argc > 2 ? atol(argv[2]) : 100;
    struct timespec pause = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&pause, NULL);
    double t1 = now();
    const char *id = getenv("MAILFLOW_DELIVERY_ID");
    char line[512];
    int len = snprintf(line, sizeof line, "%s %.6f %.6f %lld\n", id ? id : "none", t0, t1, bytes);
    int fd = open(argc > 3 ? argv[3] : "/dev/null", O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (fd < 0) {
        return 1;
    }
    flock(fd, LOCK_EX);
    if (write(fd, line, (size_t)len) != len) {
        return 1;
    }
    close(fd);
    return 0;
}
