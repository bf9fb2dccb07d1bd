//! Writes small GGUF files for tests of the reader's error handling.

/// A GGUF v3 image under construction.
#[derive(Default)]
pub struct GgufWriter {
    kvs: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_tensors: u64,
    data: Vec<u8>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

impl GgufWriter {
    pub fn string(self, key: &str, v: &str) -> Self {
        let mut payload = Vec::new();
        put_str(&mut payload, v);
        self.raw_kv(key, 8, &payload)
    }

    /// A raw metadata entry with an arbitrary type id and payload.
    pub fn raw_kv(mut self, key: &str, ty: u32, payload: &[u8]) -> Self {
        put_str(&mut self.kvs, key);
        self.kvs.extend_from_slice(&ty.to_le_bytes());
        self.kvs.extend_from_slice(payload);
        self.n_kv += 1;
        self
    }

    /// An F32 tensor with GGML dims (`dims[0]` contiguous).
    pub fn tensor_f32(mut self, name: &str, dims: &[u64], values: &[f32]) -> Self {
        while !self.data.len().is_multiple_of(32) {
            self.data.push(0);
        }
        put_str(&mut self.infos, name);
        self.infos
            .extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend_from_slice(&d.to_le_bytes());
        }
        self.infos.extend_from_slice(&0u32.to_le_bytes());
        self.infos
            .extend_from_slice(&(self.data.len() as u64).to_le_bytes());
        for v in values {
            self.data.extend_from_slice(&v.to_le_bytes());
        }
        self.n_tensors += 1;
        self
    }

    pub fn finish(self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&self.n_tensors.to_le_bytes());
        b.extend_from_slice(&self.n_kv.to_le_bytes());
        b.extend_from_slice(&self.kvs);
        b.extend_from_slice(&self.infos);
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        b.extend_from_slice(&self.data);
        b
    }
}
