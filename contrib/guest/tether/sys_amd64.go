package main

// Go 1.19's syscall package has no SYS_FINIT_MODULE.
const sysFinitModule = 313
