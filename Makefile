# libbhvit: the bit-packed BHViT runtime as a C library, and its demo program.
#
#   make                      build/libbhvit.so, build/libbhvit.a, build/bhvit_run (this machine)
#   make CROSS=aarch64-linux-gnu-   the same for ARM64 (Debian: gcc-aarch64-linux-gnu) in
#                             build/aarch64-linux-gnu/ (the directory is CROSS without its last -)
#   make check                run the kernels' self-check (RUN="qemu-aarch64 -L /usr/aarch64-linux-gnu" for ARM64)
#   make install [PREFIX=/usr/local] [DESTDIR=]   include/bhvit.h, lib/libbhvit.so.MAJOR.MINOR.PATCH
#                             (SONAME libbhvit.so.MAJOR) and its two links, lib/libbhvit.a,
#                             bin/bhvit_run, lib/pkgconfig/bhvit.pc; `make uninstall` removes them
#   make clean
#
# The library's version comes from bhvit.h: MAJOR is BHVIT_API_VERSION (it changes when the
# ABI breaks), MINOR BHVIT_VERSION_MINOR (compatible additions), PATCH BHVIT_VERSION_PATCH.
# Needs only a C compiler (OpenMP used when the compiler has it: OPENMP= to build without).
# SIMD paths are chosen at run time; do not add -march=native.

CROSS    ?=
CC       := $(CROSS)gcc
AR       := $(CROSS)ar
OPENMP   ?= -fopenmp
CFLAGS   ?= -O3
# what the library needs, kept when CFLAGS is given on the command line
BHVCFLAGS := -std=gnu11 -fPIC -ffp-contract=off -fno-trapping-math -fvisibility=hidden -Wall -Wextra $(OPENMP)
LDLIBS   := -lm
SRC      := bhvit/runtime/csrc
# every source but the demo: the kernels (see csrc/core.h), the model, json, sha256
OBJS_SRC := $(filter-out bhvit_run.c,$(notdir $(wildcard $(SRC)/*.c)))
BUILD    ?= build
OUT      := $(BUILD)$(if $(CROSS),/$(patsubst %-,%,$(CROSS)),)
OBJS     := $(addprefix $(OUT)/,$(OBJS_SRC:.c=.o))
HEADERS  := $(wildcard $(SRC)/*.h)

version   = $(shell sed -n 's/^\#define $(1) \([0-9][0-9]*\).*/\1/p' $(SRC)/bhvit.h)
MAJOR    := $(call version,BHVIT_API_VERSION)
VERSION  := $(MAJOR).$(call version,BHVIT_VERSION_MINOR).$(call version,BHVIT_VERSION_PATCH)
SONAME   := libbhvit.so.$(MAJOR)

PREFIX     ?= /usr/local
DESTDIR    ?=
BINDIR     ?= $(PREFIX)/bin
LIBDIR     ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
INSTALL    ?= install

all: $(OUT)/libbhvit.so $(OUT)/$(SONAME) $(OUT)/libbhvit.a $(OUT)/bhvit_run

# the kernels' self-check: every variant this CPU runs against a plain reference
check: $(OUT)/kernel_check
	$(RUN) $(OUT)/kernel_check

$(OUT)/%.o: $(SRC)/%.c $(HEADERS)
	@mkdir -p $(OUT)
	$(CC) $(BHVCFLAGS) $(CFLAGS) -c $< -o $@

# the library file carries its version; libbhvit.so.MAJOR (the SONAME, what programs load)
# and libbhvit.so (what -lbhvit finds) link to it
$(OUT)/libbhvit.so.$(VERSION): $(OBJS)
	$(CC) -shared $(OPENMP) -Wl,-soname,$(SONAME) -o $@ $^ $(LDLIBS)

$(OUT)/$(SONAME) $(OUT)/libbhvit.so: $(OUT)/libbhvit.so.$(VERSION)
	ln -sf libbhvit.so.$(VERSION) $@

$(OUT)/libbhvit.a: $(OBJS)
	rm -f $@  # no members left over from sources since removed
	$(AR) rcs $@ $^

$(OUT)/bhvit_run: $(SRC)/bhvit_run.c $(OUT)/libbhvit.a
	$(CC) $(BHVCFLAGS) $(CFLAGS) -static-libgcc -o $@ $< $(OUT)/libbhvit.a $(OPENMP) $(LDLIBS)

$(OUT)/kernel_check: tests/c/kernel_check.c $(OUT)/libbhvit.a
	$(CC) $(BHVCFLAGS) $(CFLAGS) -I$(SRC) -o $@ $< $(OUT)/libbhvit.a $(OPENMP) $(LDLIBS)

$(OUT)/bhvit.pc: $(SRC)/bhvit.h FORCE
	@mkdir -p $(OUT)
	printf '%s\n' 'prefix=$(PREFIX)' 'includedir=$(INCLUDEDIR)' 'libdir=$(LIBDIR)' '' \
	  'Name: bhvit' 'Description: bit-packed BHViT inference runtime (libbhvit)' 'Version: $(VERSION)' \
	  'Cflags: -I$${includedir}' 'Libs: -L$${libdir} -lbhvit' 'Libs.private: $(strip $(OPENMP) $(LDLIBS))' > $@

install: all $(OUT)/bhvit.pc
	$(INSTALL) -d '$(DESTDIR)$(INCLUDEDIR)' '$(DESTDIR)$(LIBDIR)' '$(DESTDIR)$(BINDIR)' '$(DESTDIR)$(PKGCONFIGDIR)'
	$(INSTALL) -m 644 $(SRC)/bhvit.h '$(DESTDIR)$(INCLUDEDIR)/bhvit.h'
	$(INSTALL) -m 755 $(OUT)/libbhvit.so.$(VERSION) '$(DESTDIR)$(LIBDIR)/libbhvit.so.$(VERSION)'
	ln -sf libbhvit.so.$(VERSION) '$(DESTDIR)$(LIBDIR)/$(SONAME)'
	ln -sf $(SONAME) '$(DESTDIR)$(LIBDIR)/libbhvit.so'
	$(INSTALL) -m 644 $(OUT)/libbhvit.a '$(DESTDIR)$(LIBDIR)/libbhvit.a'
	$(INSTALL) -m 755 $(OUT)/bhvit_run '$(DESTDIR)$(BINDIR)/bhvit_run'
	$(INSTALL) -m 644 $(OUT)/bhvit.pc '$(DESTDIR)$(PKGCONFIGDIR)/bhvit.pc'

uninstall:
	rm -f '$(DESTDIR)$(INCLUDEDIR)/bhvit.h' '$(DESTDIR)$(LIBDIR)/libbhvit.so.$(VERSION)' \
	  '$(DESTDIR)$(LIBDIR)/$(SONAME)' '$(DESTDIR)$(LIBDIR)/libbhvit.so' '$(DESTDIR)$(LIBDIR)/libbhvit.a' \
	  '$(DESTDIR)$(BINDIR)/bhvit_run' '$(DESTDIR)$(PKGCONFIGDIR)/bhvit.pc'

clean:
	rm -rf $(BUILD)

FORCE:

.PHONY: all check clean install uninstall FORCE
