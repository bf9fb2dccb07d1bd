// A kernel thread of the threaded engine: instantiates the engine's module on its shared memory and runs the
// helper loop of its kernel team (common/src/parallel.rs) forever.

self.onmessage = async (e: MessageEvent) => {
  const { glue, module, memory, work } = e.data as { glue: string; module: WebAssembly.Module; memory: WebAssembly.Memory; work: number };
  const wasm = await import(glue);
  await wasm.default({ module_or_path: module, memory });
  wasm.run_kernel_thread(work);
};
