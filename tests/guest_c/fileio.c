#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    if (argc < 2) return 2;
    if (chdir(argv[1]) != 0) { perror("chdir"); return 1; }
    FILE *f = fopen("a.txt", "w");
    for (int i = 0; i < 1000; i++) fprintf(f, "line %d\n", i);
    fclose(f);
    struct stat st;
    stat("a.txt", &st);
    printf("size %lld mode %o\n", (long long)st.st_size, st.st_mode & 0777);
    int fd = open("a.txt", O_RDONLY);
    char buf[64];
    lseek(fd, 100, SEEK_SET);
    ssize_t n = read(fd, buf, 20);
    printf("read %zd: %.20s\n", n, buf);
    close(fd);
    mkdir("sub", 0755);
    rename("a.txt", "sub/b.txt");
    printf("access: %d %d\n", access("a.txt", F_OK), access("sub/b.txt", R_OK));
    symlink("sub/b.txt", "link");
    char target[100] = {0};
    printf("readlink %zd %s\n", readlink("link", target, sizeof target - 1), target);
    DIR *d = opendir("sub");
    struct dirent *de;
    int count = 0;
    while ((de = readdir(d))) if (de->d_name[0] != '.') { printf("entry %s\n", de->d_name); count++; }
    closedir(d);
    char cwd[4096];
    printf("cwd ok %d\n", getcwd(cwd, sizeof cwd) != NULL);
    f = fopen("sub/b.txt", "r");
    long total = 0; int c;
    while ((c = fgetc(f)) != EOF) total += c;
    fclose(f);
    printf("checksum %ld\n", total);
    unlink("link");
    unlink("sub/b.txt");
    printf("rmdir %d\n", rmdir("sub"));
    printf("open missing: %d errno=%d\n", open("nope", O_RDONLY), errno);
    return 0;
}
