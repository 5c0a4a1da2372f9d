{
  "targets": [
    {
      "target_name": "weft",
      "sources": ["csrc/addon.cpp", "csrc/graph.cpp", "csrc/kernels.cpp", "csrc/quants.cpp", "csrc/peer.cpp", "csrc/lane.cpp"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti"],
      "cflags_cc": ["-std=c++17", "-O3", "-fexceptions", "-ffp-contract=off", "-fno-math-errno", "-Wall", "-Wno-unused-function"],
      "cflags": ["-O3"]
    }
  ]
}
