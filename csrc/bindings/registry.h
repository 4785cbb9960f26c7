// Binding files register their functions here, so that adding one is adding a file:
//   static qk::bind::Register reg([](py::module_& m) { m.def(...); });
#pragma once
#include <pybind11/pybind11.h>

#include <vector>

namespace qk {
namespace bind {

using Init = void (*)(pybind11::module_&);

inline std::vector<Init>& inits() {
  static std::vector<Init> v;
  return v;
}

struct Register {
  explicit Register(Init f) { inits().push_back(f); }
};

}  // namespace bind
}  // namespace qk
