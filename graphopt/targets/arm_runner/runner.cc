// graphopt arm runner: runs a graphopt artifact's model.so (a TVM Relax VM executable) on an aarch64
// machine or under qemu-aarch64. Linked against the aarch64 libtvm_runtime.so / libtvm_ffi.so.
//
//   graphopt-arm-runner MODEL.so IN_DIR OUT_DIR [--repeat N]
//
// Reads IN_DIR/0.bin, IN_DIR/1.bin, ... (the graph inputs in manifest order), calls the VM's `main`,
// and writes every output tensor (tuples flattened depth-first) to OUT_DIR/0.bin, 1.bin, ..., then
// OUT_DIR/sve_vl_bytes (the SVE vector length the process ran with, -1 without SVE) and OUT_DIR/count
// (the number of outputs, written last). With --repeat N, `main` runs N more times and
// the wall time of each run is printed to stderr as "time_ms <t>".
//
// Tensor file format (little endian, written and read by graphopt/targets/arm_sve.py):
//   char[4]  magic "GOT1"
//   uint32   length L of the dtype string, then L bytes (TVM dtype string: float32, int64, bool ...)
//   uint32   ndim, then ndim x int64 shape
//   uint64   nbytes, then nbytes of C-contiguous data
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <sys/prctl.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

#ifndef PR_SVE_GET_VL
#define PR_SVE_GET_VL 51
#endif
#ifndef PR_SVE_VL_LEN_MASK
#define PR_SVE_VL_LEN_MASK 0xffff
#endif

namespace {

int SveVectorLengthBytes() {
#if defined(__aarch64__)
  int r = prctl(PR_SVE_GET_VL, 0, 0, 0, 0);
  return r < 0 ? -1 : (r & PR_SVE_VL_LEN_MASK);
#else
  return -1;
#endif
}

constexpr size_t kAlign = 64;  // TVM's kAllocAlignment: compiled kernels may assume it

struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t n = ffi::GetDataSize(*t);
    size_t bytes = ((n + kAlign - 1) / kAlign) * kAlign;
    t->data = std::aligned_alloc(kAlign, bytes == 0 ? kAlign : bytes);
    if (t->data == nullptr) throw std::runtime_error("out of memory");
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

template <typename T>
void ReadPod(std::ifstream& f, T* v, const std::string& path) {
  if (!f.read(reinterpret_cast<char*>(v), sizeof(T))) throw std::runtime_error(path + ": truncated tensor file");
}

ffi::Tensor ReadTensor(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot open");
  char magic[4];
  if (!f.read(magic, 4) || std::memcmp(magic, "GOT1", 4) != 0) throw std::runtime_error(path + ": not a GOT1 tensor file");
  uint32_t len = 0;
  ReadPod(f, &len, path);
  std::string dtype(len, '\0');
  if (!f.read(&dtype[0], len)) throw std::runtime_error(path + ": truncated tensor file");
  uint32_t ndim = 0;
  ReadPod(f, &ndim, path);
  std::vector<int64_t> shape(ndim);
  for (uint32_t i = 0; i < ndim; ++i) ReadPod(f, &shape[i], path);
  uint64_t nbytes = 0;
  ReadPod(f, &nbytes, path);
  DLDevice cpu{kDLCPU, 0};
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::Shape(shape), ffi::StringToDLDataType(dtype), cpu);
  size_t want = ffi::GetDataSize(*t.GetDLTensorPtr());
  if (want != nbytes) throw std::runtime_error(path + ": data size does not match shape and dtype");
  if (nbytes && !f.read(static_cast<char*>(t.GetDLTensorPtr()->data), static_cast<std::streamsize>(nbytes)))
    throw std::runtime_error(path + ": truncated tensor data");
  return t;
}

void WriteTensor(const std::string& path, const ffi::Tensor& t) {
  const DLTensor* d = t.GetDLTensorPtr();
  if (d->device.device_type != kDLCPU) throw std::runtime_error("output tensor is not on the CPU");
  if (!t.IsContiguous()) throw std::runtime_error("output tensor is not contiguous");
  std::ofstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot create");
  std::string dtype = std::string(ffi::DLDataTypeToString(d->dtype));
  uint32_t len = static_cast<uint32_t>(dtype.size());
  uint32_t ndim = static_cast<uint32_t>(d->ndim);
  uint64_t nbytes = ffi::GetDataSize(*d);
  f.write("GOT1", 4);
  f.write(reinterpret_cast<const char*>(&len), 4);
  f.write(dtype.data(), len);
  f.write(reinterpret_cast<const char*>(&ndim), 4);
  for (int i = 0; i < d->ndim; ++i) f.write(reinterpret_cast<const char*>(&d->shape[i]), 8);
  f.write(reinterpret_cast<const char*>(&nbytes), 8);
  if (nbytes) f.write(static_cast<const char*>(d->data) + d->byte_offset, static_cast<std::streamsize>(nbytes));
  if (!f) throw std::runtime_error(path + ": write failed");
}

void Flatten(const ffi::Any& v, std::vector<ffi::Tensor>* out) {
  if (auto t = v.try_cast<ffi::Tensor>()) {
    out->push_back(*t);
  } else if (auto arr = v.try_cast<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& e : *arr) Flatten(e, out);
  } else {
    throw std::runtime_error("main returned a value that is neither a tensor nor a tuple (type " + v.GetTypeKey() + ")");
  }
}

bool Exists(const std::string& path) {
  std::ifstream f(path);
  return static_cast<bool>(f);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 && !(argc == 6 && std::string(argv[4]) == "--repeat")) {
    std::cerr << "usage: " << argv[0] << " MODEL.so IN_DIR OUT_DIR [--repeat N]\n";
    return 2;
  }
  std::string lib = argv[1], in_dir = argv[2], out_dir = argv[3];
  int repeat = argc == 6 ? std::atoi(argv[5]) : 0;
  // dlopen only searches the library path for names without a slash
  if (lib.find('/') == std::string::npos) lib = "./" + lib;
  try {
    ffi::Module mod = ffi::Module::LoadFromFile(lib);
    ffi::Optional<ffi::Function> load_exec = mod->GetFunction("vm_load_executable");
    if (!load_exec.has_value()) throw std::runtime_error(lib + ": not a Relax VM executable (no vm_load_executable)");
    ffi::Module vm = (*load_exec)().cast<ffi::Module>();
    // device type, device id, allocator type (2 = pooled), as relax.VirtualMachine(lib, tvm.cpu()) does
    ffi::Function init = vm->GetFunction("vm_initialization").value();
    init(static_cast<int>(kDLCPU), 0, 2);
    ffi::Function fmain = vm->GetFunction("main").value();

    std::vector<ffi::Tensor> inputs;
    for (int i = 0;; ++i) {
      std::string p = in_dir + "/" + std::to_string(i) + ".bin";
      if (!Exists(p)) break;
      inputs.push_back(ReadTensor(p));
    }
    std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
    ffi::Any ret;
    fmain.CallPacked(args.data(), static_cast<int32_t>(args.size()), &ret);
    for (int r = 0; r < repeat; ++r) {
      ffi::Any tmp;
      auto t0 = std::chrono::steady_clock::now();
      fmain.CallPacked(args.data(), static_cast<int32_t>(args.size()), &tmp);
      auto t1 = std::chrono::steady_clock::now();
      std::cerr << "time_ms " << std::chrono::duration<double, std::milli>(t1 - t0).count() << "\n";
    }
    std::vector<ffi::Tensor> outs;
    Flatten(ret, &outs);
    for (size_t i = 0; i < outs.size(); ++i) WriteTensor(out_dir + "/" + std::to_string(i) + ".bin", outs[i]);
    std::ofstream vl(out_dir + "/sve_vl_bytes");
    vl << SveVectorLengthBytes() << "\n";
    vl.close();
    std::ofstream count(out_dir + "/count");
    count << outs.size() << "\n";
    if (!count) throw std::runtime_error(out_dir + "/count: write failed");
  } catch (const ffi::Error& e) {
    std::string msg = e.message();
    std::cerr << "graphopt-arm-runner: " << e.kind() << ": " << msg << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "graphopt-arm-runner: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
