# libbhvit: the bit-packed BHViT runtime as a C library, and its demo program.
#
#   make                      build/libbhvit.so, build/libbhvit.a, build/bhvit_run (this machine)
#   make CROSS=aarch64-linux-gnu-   the same for ARM64 (Debian: gcc-aarch64-linux-gnu) in build/aarch64/
#   make check                run the kernels' self-check (RUN="qemu-aarch64 -L /usr/aarch64-linux-gnu" for ARM64)
#   make clean
#
# Needs only a C compiler (OpenMP used when the compiler has it: OPENMP= to build without).
# SIMD paths are chosen at run time; do not add -march=native.

CROSS    ?=
CC       := $(CROSS)gcc
AR       := $(CROSS)ar
OPENMP   ?= -fopenmp
CFLAGS   ?= -O3
# what the library needs, kept when CFLAGS is given on the command line
BHVCFLAGS := -std=gnu11 -fPIC -ffp-contract=off -fvisibility=hidden -Wall -Wextra $(OPENMP)
LDLIBS   := -lm
SRC      := bhvit/runtime/csrc
# every source but the demo: the kernels (see csrc/core.h), the model, json, sha256
OBJS_SRC := $(filter-out bhvit_run.c,$(notdir $(wildcard $(SRC)/*.c)))
BUILD    ?= build
OUT      := $(BUILD)$(if $(CROSS),/$(patsubst %-,%,$(CROSS)),)
OBJS     := $(addprefix $(OUT)/,$(OBJS_SRC:.c=.o))
HEADERS  := $(wildcard $(SRC)/*.h)

all: $(OUT)/libbhvit.so $(OUT)/libbhvit.a $(OUT)/bhvit_run

# the kernels' self-check: every variant this CPU runs against a plain reference
check: $(OUT)/kernel_check
	$(RUN) $(OUT)/kernel_check

$(OUT)/%.o: $(SRC)/%.c $(HEADERS)
	@mkdir -p $(OUT)
	$(CC) $(BHVCFLAGS) $(CFLAGS) -c $< -o $@

$(OUT)/libbhvit.so: $(OBJS)
	$(CC) -shared $(OPENMP) -o $@ $^ $(LDLIBS)

$(OUT)/libbhvit.a: $(OBJS)
	rm -f $@  # no members left over from sources since removed
	$(AR) rcs $@ $^

$(OUT)/bhvit_run: $(SRC)/bhvit_run.c $(OUT)/libbhvit.a
	$(CC) $(BHVCFLAGS) $(CFLAGS) -static-libgcc -o $@ $< $(OUT)/libbhvit.a $(OPENMP) $(LDLIBS)

$(OUT)/kernel_check: tests/c/kernel_check.c $(OUT)/libbhvit.a
	$(CC) $(BHVCFLAGS) $(CFLAGS) -I$(SRC) -o $@ $< $(OUT)/libbhvit.a $(OPENMP) $(LDLIBS)

clean:
	rm -rf $(BUILD)

.PHONY: all check clean
