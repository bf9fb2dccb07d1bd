//! The model on a native wgpu device (Vulkan, Metal, DX12; lavapipe where there is no GPU) against the CPU's exact
//! f32 path: the same greedy tokens, and how long each took. The browser runs the same code on WebGPU.
//!
//! `cargo run --release -p tandem-common --features webgpu --example webgpu_parity -- MODEL.gguf [PROMPT]`

use burn::tensor::Device;
use tandem_common::engine::Engine;
use tandem_common::quant::Precision;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: webgpu_parity MODEL.gguf [PROMPT]")?;
    let prompt = args
        .next()
        .unwrap_or_else(|| "The capital of France is".into());
    let gpu = Device::wgpu_options().init()?;
    let mut answers = Vec::new();
    for (name, device) in [("cpu f32", Device::flex()), ("wgpu", gpu)] {
        let t0 = std::time::Instant::now();
        let e = Engine::open(path.as_ref(), &device)?;
        let loaded = t0.elapsed();
        let mut s = e.session();
        s.set_precision(Precision::F32);
        let t0 = std::time::Instant::now();
        let mut logits = s.prefill(&e.tokenizer.encode(&prompt)?)?;
        let mut ids = Vec::new();
        for _ in 0..12 {
            let id = tandem_common::sample::argmax(&logits);
            ids.push(id);
            logits = s.decode(id)?;
        }
        println!(
            "{name}: loaded in {loaded:?}, 12 tokens in {:?}: {ids:?}",
            t0.elapsed()
        );
        answers.push(ids);
    }
    if answers[0] != answers[1] {
        return Err("the wgpu device's greedy tokens differ from the CPU's".into());
    }
    println!("same greedy tokens");
    Ok(())
}
