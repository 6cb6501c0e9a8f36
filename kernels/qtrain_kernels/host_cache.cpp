// A caching allocator for torch's CPU tensors (built and loaded by host_cache.py).
//
// A training step allocates and frees the same large tensors every step (activations, dequantized
// weights, gradients). Served by glibc, their freed blocks become holes in its heap that stay
// resident, and the next step's different interleaving leaves new ones: the process's RSS climbs to
// several times the bytes live at once. This allocator keeps each large block (>= kMinBlock bytes)
// out of glibc's heap: mapped on its own, page-rounded, and on free kept for the next request of
// (nearly) its size: best fit, serving requests down to 4/5 of a block. Two bounds keep what it holds
// near what is live at most: a freed block that would take the cached bytes over the most bytes ever
// live at once is unmapped, and before mapping a new block it unmaps the least recently freed cached
// ones until what it maps stays within 1.25x that high-water. Smaller requests go to the allocator it
// replaced.
//
// Installed with c10::SetCPUAllocator (torch's registration point for a CPU allocator); tensors
// allocated before keep their own deleter. Thread-safe; a fork keeps the lock consistent.

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>

namespace {

constexpr size_t kMinBlock = size_t(1) << 16;
constexpr size_t kPage = 4096;
constexpr size_t kSlack = 4;  // a cached block serves requests down to 1/(1 + 1/kSlack) of its size

struct Stats {
  size_t live = 0, peak_live = 0, cached = 0, mapped = 0, peak_mapped = 0;
  uint64_t hits = 0, misses = 0, unmapped = 0;
};

struct FreeBlock {
  void* p;
  size_t size;
};
using FreeList = std::list<FreeBlock>;

struct State {
  std::mutex mu;
  FreeList free_order;  // cached blocks, least recently freed first
  std::multimap<size_t, FreeList::iterator> free_by_size;  // the same blocks, for best fit
  std::unordered_map<void*, size_t> size_of;  // every block mapped and not yet unmapped
  Stats stats;
};

State& state() {
  static State* s = new State();  // never destroyed: tensors may be freed during interpreter exit
  return *s;
}

void* map_block(size_t size) {
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

void forget(State& s, void* p, size_t size) {
  munmap(p, size);
  s.size_of.erase(p);
  s.stats.mapped -= size;
  s.stats.unmapped += size;
}

// Take a cached block out of both indexes; the caller holds the lock.
void uncache(State& s, std::multimap<size_t, FreeList::iterator>::iterator it) {
  s.stats.cached -= it->first;
  s.free_order.erase(it->second);
  s.free_by_size.erase(it);
}

// Unmap the least recently freed cached block; the caller holds the lock.
void evict_oldest(State& s) {
  const FreeBlock oldest = s.free_order.front();
  auto range = s.free_by_size.equal_range(oldest.size);
  auto it = range.first;
  while (it != range.second && it->second != s.free_order.begin()) ++it;
  TORCH_INTERNAL_ASSERT(it != range.second, "qtrain host cache: a cached block is missing from its size index");
  uncache(s, it);
  forget(s, oldest.p, oldest.size);
}

// Unmap every cached block; the caller holds the lock. Returns the bytes unmapped.
size_t release_locked(State& s) {
  const size_t bytes = s.stats.cached;
  while (!s.free_order.empty()) evict_oldest(s);
  return bytes;
}

// Return a block to the cache (or unmap it over the cap); the caller holds the lock.
void free_locked(State& s, void* p, size_t size) {
  s.stats.live -= size;
  if (s.stats.cached + size > s.stats.peak_live) {
    forget(s, p, size);
    return;
  }
  s.free_order.push_back({p, size});
  s.free_by_size.emplace(size, std::prev(s.free_order.end()));
  s.stats.cached += size;
}

at::DeleterFnPtr previous_raw_deleter = nullptr;

// The one deleter: of the DataPtrs this allocator hands out, and its raw deleter
// (Allocator::raw_deallocate; oneDNN's scratch memory comes and goes through raw_allocate /
// raw_deallocate), where a pointer may also be a small allocation the previous allocator served.
void free_any(void* p) {
  {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    auto it = s.size_of.find(p);
    if (it != s.size_of.end()) {
      free_locked(s, p, it->second);
      return;
    }
  }
  previous_raw_deleter(p);
}

void* take_block(size_t size) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.free_by_size.lower_bound(size);
  void* p = nullptr;
  size_t got = 0;
  if (it != s.free_by_size.end() && it->first <= size + size / kSlack) {
    p = it->second->p;
    got = it->first;
    uncache(s, it);
    s.stats.hits++;
  } else {
    // A new block: first unmap the least recently freed cached ones until what is mapped stays
    // within 1.25x the live high-water (or what is live with this block, when that is higher).
    const size_t target = std::max(s.stats.peak_live + s.stats.peak_live / 4, s.stats.live + size);
    while (!s.free_order.empty() && s.stats.mapped + size > target) evict_oldest(s);
    p = map_block(size);
    if (p == nullptr && release_locked(s) > 0) p = map_block(size);
    if (p == nullptr) return nullptr;
    got = size;
    s.size_of.emplace(p, size);
    s.stats.mapped += size;
    s.stats.misses++;
    if (s.stats.mapped > s.stats.peak_mapped) s.stats.peak_mapped = s.stats.mapped;
  }
  s.stats.live += got;
  if (s.stats.live > s.stats.peak_live) s.stats.peak_live = s.stats.live;
  return p;
}

struct CachingHostAllocator final : at::Allocator {
  explicit CachingHostAllocator(at::Allocator* previous) : previous(previous) {}

  at::DataPtr allocate(size_t n) override {
    if (n < kMinBlock) return previous->allocate(n);
    void* p = take_block((n + kPage - 1) & ~(kPage - 1));
    TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "qtrain host cache: cannot map ", n, " bytes");
    return {p, p, &free_any, at::Device(at::DeviceType::CPU)};
  }

  at::DeleterFnPtr raw_deleter() const override { return &free_any; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  at::Allocator* previous;
};

CachingHostAllocator* installed = nullptr;

void lock_for_fork() { state().mu.lock(); }
void unlock_after_fork() { state().mu.unlock(); }

}  // namespace

// Install the allocator (once per process). Returns 1 when torch's CPU allocator is now this one,
// 0 when another of higher priority is, -1 when the current one has no raw deleter to fall back on.
extern "C" int qtrain_host_cache_install(int priority) {
  if (installed == nullptr) {
    at::Allocator* previous = c10::GetCPUAllocator();
    if (previous->raw_deleter() == nullptr) return -1;
    previous_raw_deleter = previous->raw_deleter();
    installed = new CachingHostAllocator(previous);
    pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork);
  }
  c10::SetCPUAllocator(installed, static_cast<uint8_t>(priority));
  return c10::GetCPUAllocator() == installed ? 1 : 0;
}

// Unmap the cached (free) blocks; returns the bytes given back.
extern "C" size_t qtrain_host_cache_release() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return release_locked(s);
}

// Fills out[0..7]: live, peak_live, cached, mapped, peak_mapped bytes; hits, misses; bytes unmapped.
extern "C" void qtrain_host_cache_stats(uint64_t* out) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  const Stats& t = s.stats;
  const uint64_t values[8] = {t.live, t.peak_live, t.cached, t.mapped, t.peak_mapped, t.hits, t.misses, t.unmapped};
  for (int i = 0; i < 8; ++i) out[i] = values[i];
}
