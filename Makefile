# dsv2: DeepSeek-V2 in one C file.   make run | make test | make bench
CC ?= cc
CFLAGS ?= -O3 -march=native
WARN = -std=c11 -Wall -Wextra
OMP = -fopenmp
# export.py needs numpy: use the first python3 that has it (Debian's /usr/bin/python3 with python3-numpy).
PYTHON ?= $(shell for p in python3 /usr/bin/python3; do $$p -c 'import numpy' 2>/dev/null && echo $$p && break; done)
SAN = -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined

.PHONY: all test test-asan test-arm clean run class docs-check bench bench-full cuda test-cuda fuzz fuzz-smoke fuzz-long

all: dsv2

dsv2: dsv2.c
	$(CC) $(WARN) $(CFLAGS) $(OMP) -o $@ dsv2.c -lm

test_all: test_all.c dsv2.c
	$(CC) $(WARN) -Wno-unused-function $(CFLAGS) $(OMP) -o $@ test_all.c -lm

# tests/setup.sh finds (or, as root, installs) a python3 with numpy for export.py.
test: dsv2 test_all
	@PYTHON=$$(tests/setup.sh) && echo "PYTHON=$$PYTHON ./test_all" && PYTHON=$$PYTHON ./test_all

# The same suite with AddressSanitizer and UndefinedBehaviorSanitizer in both binaries.
dsv2_asan: dsv2.c
	$(CC) $(WARN) $(SAN) $(OMP) -o $@ dsv2.c -lm
test_all_asan: test_all.c dsv2.c
	$(CC) $(WARN) -Wno-unused-function $(SAN) $(OMP) -o $@ test_all.c -lm
test-asan: dsv2_asan test_all_asan
	@PYTHON=$$(tests/setup.sh) && PYTHON=$$PYTHON DSV2_BIN=./dsv2_asan DSV2_SKIP_DOCS=1 ./test_all_asan

# ARM64 (NEON + dot product) cross-compiled and run under qemu-user: correctness, not speed.
test-arm:
	PYTHON=$(PYTHON) tests/arm.sh

# The GPU build: dsv2.c as the host program (-DDSV2_CUDA) linked with dsv2.cu. Warnings are errors.
NVCC ?= $(shell command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)
# sm_80 (A100), sm_90 (H100/H200) machine code, and compute_90 PTX that newer GPUs compile at load.
CUDA_ARCH ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90
NVFLAGS = -O3 -std=c++17 $(CUDA_ARCH) -Werror all-warnings -Xcompiler -Wall,-Wextra
cuda: dsv2cu build/cuda_kernels
	@for f in tests/test_cuda.sh tests/gpu_check.sh; do bash -n $$f || exit 1; done
dsv2cu: dsv2.c dsv2.cu
	@mkdir -p build
	$(CC) $(WARN) -Werror -O3 $(OMP) -DDSV2_CUDA -c dsv2.c -o build/dsv2_host.o
	$(NVCC) $(NVFLAGS) -c dsv2.cu -o build/dsv2_gpu.o
	$(NVCC) $(CUDA_ARCH) -o $@ build/dsv2_host.o build/dsv2_gpu.o -Xcompiler -fopenmp -lm
# Each GPU kernel against dsv2.c's function on the same inputs (llm.c's dev/cuda): error and GB/s.
build/cuda_kernels: tests/cuda_kernels.cu tests/cuda_kernels_ref.c dsv2.c dsv2.cu
	@mkdir -p build
	$(CC) $(WARN) -Werror -Wno-unused-function -O3 $(OMP) -c tests/cuda_kernels_ref.c -o build/cuda_kernels_ref.o
	$(NVCC) $(NVFLAGS) -c tests/cuda_kernels.cu -o build/cuda_kernels.o
	$(NVCC) $(CUDA_ARCH) -o $@ build/cuda_kernels.o build/cuda_kernels_ref.o -Xcompiler -fopenmp -lm
# On a machine with a GPU: the kernel checks, the fixtures through ./dsv2cu, GPU vs CPU layer by
# layer on random V2-Lite and V2 shapes, -g 0,0 == -g 0, a 5,000-position run (tests/test_cuda.sh).
# tests/gpu_check.sh: all of that plus GPU speed, into one report (the first GPU session's script).
test-cuda: cuda dsv2 test_all
	PYTHON=$(PYTHON) tests/test_cuda.sh

# Fuzzing (tests/fuzz.c, tests/fuzz_export.py) under AFL++ (Debian: apt-get install -y afl++), with
# AddressSanitizer and UBSan: fuzz-smoke runs every target 30 s (CI), fuzz-long an hour each.
AFL_CC ?= afl-clang-fast
fuzz: build/fuzz
build/fuzz: tests/fuzz.c dsv2.c
	@mkdir -p build
	AFL_USE_ASAN=1 AFL_USE_UBSAN=1 AFL_QUIET=1 $(AFL_CC) -O1 -g $(WARN) -Wno-unused-function -o $@ tests/fuzz.c -lm
fuzz-smoke: build/fuzz
	PYTHON=$(PYTHON) tests/fuzz.sh 30
fuzz-long: build/fuzz
	PYTHON=$(PYTHON) tests/fuzz.sh 3600

clean:
	rm -f dsv2 test_all dsv2_asan test_all_asan dsv2cu

# The built-in model: DeepSeek-V2 architecture, 3.4M parameters, trained by dsv2.c on the KJV
# Bible (models/tiny/README.md has the exact commands that reproduce it).
run: dsv2
	./dsv2 models/tiny/model.bin -i "And God said" -n 120 -t 0.8 -p 0.9 -s 42

# The class model (models/class): DeepSeek-V2's 236B features at toy size (q LoRA, group-limited
# routing), trained on Genesis in about 3 minutes on 2 cores, then a sample. docs/walkthrough.md.
class: dsv2
	@mkdir -p build
	$(PYTHON) export.py --random models/class/config.json build/class-init.bin --dtype f32 --seed 1
	./dsv2 build/class-init.bin -m train -f models/class/genesis.txt -o build/class.bin -n 400 -e 100 -s 1
	./dsv2 build/class.bin -i "And God said" -n 60 -t 0.8 -s 42

# Every command of docs/, the ones that need the class model too (make test runs the others).
docs-check: class test_all
	PYTHON=$(PYTHON) SLOW=1 tests/docs.sh

# Speed on random weights of real shapes: V2-Lite at 8 layers (quick); bench-full: all 27, and
# 2 of the 60 layers of the 236B DeepSeek-V2. Each prints the CPU, its measured peak, a table,
# then decode speed against context length.
bench: dsv2
	PYTHON=$(PYTHON) tests/bench.sh 8 "q8 q4 bf16" 5 lite "2048 8192"
bench-full: dsv2
	PYTHON=$(PYTHON) tests/bench.sh 27 "q8 q4" 3 lite "2048 8192 32768"
	PYTHON=$(PYTHON) tests/bench.sh 2 "q8" 3 v2 ""
