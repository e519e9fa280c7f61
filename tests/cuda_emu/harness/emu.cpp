// The harness's scheduler (see emu.h). A block runs as blockDim fibers on the calling OS thread; each fiber runs
// until it reaches a barrier or a warp collective or returns. When none can run, waiting warp collectives whose
// every lane has arrived complete, else a barrier every thread waits at opens; anything else is a divergence
// or a deadlock and is reported. The context switch is a few instructions of x86-64 assembly (swapcontext makes a
// system call per switch, which the warp-shuffle-heavy kernels cannot afford).
#include "emu.h"

#include <c10/util/Exception.h>
#include <cxxabi.h>
#include <dlfcn.h>

#include <cstdlib>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define LORA_OPS_EMU_ASAN 1
#endif

#if !defined(__x86_64__)
#error "the CUDA execution harness's context switch is written for x86-64"
#endif

// lora_ops_emu_switch(&save_sp, next_sp): pushes the callee-saved registers, saves the stack pointer, loads the
// other fiber's and pops its registers; `ret` resumes it where it switched away (or enters fiber_main).
asm(R"(
.text
.globl lora_ops_emu_switch
.type lora_ops_emu_switch,@function
lora_ops_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size lora_ops_emu_switch, .-lora_ops_emu_switch
.section .note.GNU-stack,"",@progbits
)");
extern "C" void lora_ops_emu_switch(void** save_sp, void* next_sp);

namespace lora_ops::emu {
namespace {

#ifdef LORA_OPS_EMU_ASAN
constexpr size_t kStackBytes = 512 * 1024;  // instrumented frames are larger
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif

enum class State { kRunnable, kBarrier, kWarp, kDone };

struct Fiber {
  uint3 idx;
  int lane = 0, warp = 0;
  State state = State::kRunnable;
  void* sp = nullptr;
  // the pending barrier or collective
  const char* file = nullptr;
  int line = 0;
  Op op = Op::kSyncWarp;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = 32;
};

struct Block {
  uint3 idx;
  dim3 dim, grid;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  void* main_sp = nullptr;
  const std::function<void()>* body = nullptr;
  unsigned char* smem = nullptr;
#ifdef LORA_OPS_EMU_ASAN
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
#endif
};

thread_local Block* tls_block = nullptr;
thread_local std::vector<std::unique_ptr<char[]>> tls_stacks;  // reused across launches

const char* op_name(Op op) {
  switch (op) {
    case Op::kSyncWarp: return "__syncwarp";
    case Op::kShflXor: return "__shfl_xor_sync";
    case Op::kShfl: return "__shfl_sync";
    case Op::kShflDown: return "__shfl_down_sync";
    case Op::kShflUp: return "__shfl_up_sync";
    case Op::kBallot: return "__ballot_sync";
    case Op::kAny: return "__any_sync";
    case Op::kAll: return "__all_sync";
  }
  return "?";
}

std::string kernel_name(const void* kernel) {
  Dl_info info{};
  if (!dladdr(kernel, &info) || !info.dli_sname || info.dli_saddr != kernel) return "<kernel>";  // not exported
  int status = 0;
  char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string name = status == 0 && demangled ? demangled : info.dli_sname;
  std::free(demangled);
  if (name.rfind("void ", 0) == 0) name = name.substr(5);  // a template's demangled name starts with its return type
  return name.substr(0, name.find('('));  // the template arguments say which instantiation; drop the parameters
}

std::string dims(const dim3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

// Fiber -> scheduler.
void yield() {
  Block* b = tls_block;
  Fiber* f = b->current;
#ifdef LORA_OPS_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(f->state == State::kDone ? nullptr : &fake, b->main_stack_bottom,
                                 b->main_stack_size);
  lora_ops_emu_switch(&f->sp, b->main_sp);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  lora_ops_emu_switch(&f->sp, b->main_sp);
#endif
}

void fiber_main() {
  Block* b = tls_block;
#ifdef LORA_OPS_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b->main_stack_bottom, &b->main_stack_size);
#endif
  (*b->body)();
  b->current->state = State::kDone;
  yield();  // never resumed
  std::abort();
}

// Scheduler -> fiber f (runs it until it blocks or returns).
void resume(Block& b, Fiber& f, char* stack) {
  b.current = &f;
#ifdef LORA_OPS_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, stack, kStackBytes);
  lora_ops_emu_switch(&b.main_sp, f.sp);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  (void)stack;
  lora_ops_emu_switch(&b.main_sp, f.sp);
#endif
}

// A fresh stack whose first switch enters fiber_main with the ABI's call alignment (rsp = 8 mod 16).
void* initial_stack(char* stack) {
#ifdef LORA_OPS_EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(stack, kStackBytes);  // frames of an earlier block's fibers
#endif
  auto top = reinterpret_cast<uintptr_t>(stack + kStackBytes) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<void**>(top - 64);
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;  // r15, r14, r13, r12, rbx, rbp
  sp[6] = reinterpret_cast<void*>(&fiber_main);   // popped by ret
  sp[7] = nullptr;                                // fiber_main's (unused) return address
  return sp;
}

// Completes every warp collective whose lanes have all arrived. Returns false (with `error`) on a collective that
// can never complete: a lane of its mask has exited, waits at a barrier or at another collective.
bool complete_collectives(Block& b, bool* progress, std::string* error) {
  const int n = static_cast<int>(b.fibers.size());
  for (Fiber& f : b.fibers) {
    if (f.state != State::kWarp) continue;
    auto where = [&f] {  // built only for a report
      std::ostringstream os;
      os << op_name(f.op) << " (mask 0x" << std::hex << f.mask << std::dec << ") in warp " << f.warp << ", lane "
         << f.lane;
      return os;
    };
    if (!(f.mask >> f.lane & 1u)) {
      *error = where().str() + ": the calling lane is not in the mask";
      return false;
    }
    if (f.width != 32) {
      *error = where().str() + ": only width 32 is emulated";
      return false;
    }
    Fiber* lanes[32] = {};
    bool ready = true;
    for (int l = 0; l < 32 && ready; ++l) {
      if (!(f.mask >> l & 1u)) continue;
      const int t = f.warp * 32 + l;
      if (t >= n) {
        *error = where().str() + ": mask names lane " + std::to_string(l) + ", past blockDim";
        return false;
      }
      Fiber& g = b.fibers[t];
      if (g.state == State::kRunnable) {  // released by a collective completed in this pass: look again later
        ready = false;
        break;
      }
      if (g.state == State::kDone || g.state == State::kBarrier) {
        *error = where().str() + ": lane " + std::to_string(l) + " of the mask " +
                 (g.state == State::kDone ? "has exited" : "waits at __syncthreads") + " (lanes disagree)";
        return false;
      }
      if (g.state != State::kWarp || g.op != f.op || g.mask != f.mask) {
        *error = where().str() + ": lane " + std::to_string(l) + " waits at " + op_name(g.op) + " with another mask";
        return false;
      }
      lanes[l] = &g;
    }
    if (!ready) continue;
    uint64_t ballot = 0;
    for (int l = 0; l < 32; ++l) {
      if (lanes[l] && lanes[l]->value) ballot |= uint64_t(1) << l;
    }
    for (int l = 0; l < 32; ++l) {
      Fiber* g = lanes[l];
      if (!g) continue;
      int src = l;
      switch (f.op) {
        case Op::kShflXor: src = l ^ g->arg; break;
        case Op::kShfl: src = g->arg & 31; break;
        case Op::kShflDown: src = l + g->arg < 32 ? l + g->arg : l; break;
        case Op::kShflUp: src = l - g->arg >= 0 ? l - g->arg : l; break;
        default: break;
      }
      if (src < 0 || src > 31 || !lanes[src]) {
        *error = where().str() + ": lane " + std::to_string(l) + " reads lane " + std::to_string(src) +
                 ", which is not in the mask";
        return false;
      }
      switch (f.op) {
        case Op::kBallot: g->result = ballot; break;
        case Op::kAny: g->result = ballot != 0; break;
        case Op::kAll: g->result = ballot == f.mask; break;
        case Op::kSyncWarp: g->result = 0; break;
        default: g->result = lanes[src]->value;
      }
    }
    for (Fiber* g : lanes) {
      if (g) g->state = State::kRunnable;
    }
    *progress = true;
  }
  return true;
}

// Opens the block barrier when every thread waits at it (at one call site). Returns false with `error` when the
// block can make no progress: some threads wait at a barrier the others can no longer reach.
bool open_barrier(Block& b, std::string* error) {
  int waiting = 0, done = 0;
  const Fiber* first = nullptr;
  for (const Fiber& f : b.fibers) {
    if (f.state == State::kDone) ++done;
    if (f.state != State::kBarrier) continue;
    ++waiting;
    if (!first) first = &f;
    if (f.file != first->file || f.line != first->line) {
      *error = "threads wait at different __syncthreads (lines " + std::to_string(first->line) + " and " +
               std::to_string(f.line) + ")";
      return false;
    }
  }
  const int n = static_cast<int>(b.fibers.size());
  if (waiting == n) {
    for (Fiber& f : b.fibers) f.state = State::kRunnable;
    return true;
  }
  *error = "__syncthreads at line " + std::to_string(first ? first->line : 0) + " reached by " +
           std::to_string(waiting) + " of " + std::to_string(n) + " threads (" + std::to_string(done) +
           " exited before it)";
  return false;
}

void run_block(Block& b, const std::vector<char*>& stacks) {
  const int n = static_cast<int>(b.fibers.size());
  for (int t = 0; t < n; ++t) {
    Fiber& f = b.fibers[t];
    f = Fiber{};
    f.idx = {static_cast<unsigned>(t % b.dim.x), static_cast<unsigned>(t / b.dim.x % b.dim.y),
             static_cast<unsigned>(t / (b.dim.x * b.dim.y))};
    f.lane = t % 32;
    f.warp = t / 32;
    f.sp = initial_stack(stacks[t]);
  }
  const bool reverse = config().reverse;
  for (;;) {
    for (int i = 0; i < n; ++i) {
      const int t = reverse ? n - 1 - i : i;
      if (b.fibers[t].state == State::kRunnable) resume(b, b.fibers[t], stacks[t]);
    }
    bool all_done = true;
    for (const Fiber& f : b.fibers) all_done = all_done && f.state == State::kDone;
    if (all_done) return;
    std::string error;
    bool progress = false;
    if (complete_collectives(b, &progress, &error) && (progress || open_barrier(b, &error))) continue;
    TORCH_CHECK(false, "CUDA harness: block ", dims(dim3(b.idx.x, b.idx.y, b.idx.z)), ": ", error);
  }
}

std::mutex log_mutex;
std::vector<std::string> launch_log;

}  // namespace

Config& config() {
  static Config c;
  return c;
}

const uint3& thread_index() { return tls_block->current->idx; }
const uint3& block_index() { return tls_block->idx; }
const dim3& block_dim() { return tls_block->dim; }
const dim3& grid_dim() { return tls_block->grid; }
void* dynamic_smem() { return tls_block->smem; }

void syncthreads(const char* file, int line) {
  Fiber* f = tls_block->current;
  f->state = State::kBarrier;
  f->file = file;
  f->line = line;
  yield();
}

uint64_t warp_op(Op op, unsigned mask, uint64_t value, int arg, int width) {
  Fiber* f = tls_block->current;
  f->state = State::kWarp;
  f->op = op;
  f->mask = mask;
  f->value = value;
  f->arg = arg;
  f->width = width;
  yield();
  return f->result;
}

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const std::string name = kernel_name(kernel);
  {
    const std::lock_guard<std::mutex> lock(log_mutex);
    launch_log.push_back(name + " grid=" + dims(grid) + " block=" + dims(block) + " smem=" + std::to_string(smem));
  }
  // The limits of the CUDA runtime (compute capability 9.0): a launch outside them fails on the GPU.
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && block.x >= 1 && block.y >= 1 && block.z >= 1,
              "CUDA harness: ", name, ": empty launch grid=", dims(grid), " block=", dims(block));
  TORCH_CHECK(grid.x <= 2147483647u && grid.y <= 65535u && grid.z <= 65535u, "CUDA harness: ", name,
              ": grid ", dims(grid), " exceeds the limits (2^31 - 1, 65535, 65535)");
  TORCH_CHECK(threads <= 1024 && block.z <= 64, "CUDA harness: ", name, ": block ", dims(block), " too large");
  TORCH_CHECK(smem <= 227 * 1024, "CUDA harness: ", name, ": ", smem, " bytes of dynamic shared memory");

  if (tls_stacks.size() < threads) tls_stacks.resize(threads);
  std::vector<char*> stacks(threads);
  for (uint64_t t = 0; t < threads; ++t) {
    if (!tls_stacks[t]) tls_stacks[t].reset(new char[kStackBytes]);
    stacks[t] = tls_stacks[t].get();
  }
  Block b;
  b.dim = block;
  b.grid = grid;
  b.body = &body;
  b.fibers.resize(threads);
  Block* saved = tls_block;  // a launch from inside a kernel is not supported, but keep the state sane
  tls_block = &b;
  const uint64_t count = uint64_t(grid.x) * grid.y * grid.z;
  try {
    for (uint64_t i = 0; i < count; ++i) {
      const uint64_t j = config().reverse ? count - 1 - i : i;
      b.idx = {static_cast<unsigned>(j % grid.x), static_cast<unsigned>(j / grid.x % grid.y),
               static_cast<unsigned>(j / (uint64_t(grid.x) * grid.y))};
      // A fresh allocation of exactly smem bytes per block (ASan sees overruns), filled with 0xff (NaN as
      // floats) so that reads of shared memory nobody wrote show up in the results.
      std::unique_ptr<unsigned char[]> dyn(smem ? new unsigned char[smem] : nullptr);
      if (smem) std::memset(dyn.get(), 0xff, smem);
      b.smem = dyn.get();
      run_block(b, stacks);
    }
  } catch (...) {
    tls_block = saved;
    throw;
  }
  tls_block = saved;
}

}  // namespace lora_ops::emu

// ---- C interface for lora_ops/_emu.py (ctypes) ----
extern "C" void lora_ops_emu_configure(int64_t sm_count, int reverse) {
  lora_ops::emu::config().sm_count = sm_count;
  lora_ops::emu::config().reverse = reverse != 0;
}

// Copies the launches since the last call, one per line, into buf (NUL-terminated, truncated to size) and
// forgets them. Returns the length of the full text.
extern "C" int64_t lora_ops_emu_take_launches(char* buf, int64_t size) {
  std::string text;
  {
    const std::lock_guard<std::mutex> lock(lora_ops::emu::log_mutex);
    for (const auto& line : lora_ops::emu::launch_log) text += line + "\n";
    lora_ops::emu::launch_log.clear();
  }
  if (size > 0) {
    const size_t n = std::min<size_t>(text.size(), static_cast<size_t>(size - 1));
    std::memcpy(buf, text.data(), n);
    buf[n] = '\0';
  }
  return static_cast<int64_t>(text.size());
}
