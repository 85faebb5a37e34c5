{
  "targets": [
    {
      "target_name": "ferry",
      "sources": [
        "native/addon.cc",
        "native/errors.cc",
        "native/kvm.cc",
        "native/vm.cc",
        "native/vcpu.cc",
        "native/memory.cc",
        "native/uffd.cc",
        "native/fdio.cc",
        "native/splice.cc",
        "native/bitmap.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "dependencies": ["<!(node -p \"require('node-addon-api').targets\"):node_addon_api_except"],
      "defines": ["NAPI_VERSION=8"],
      "cflags_cc": ["-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fexceptions"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++14", "-std=gnu++17"],
      "libraries": ["-lpthread"]
    }
  ]
}
