//! The attention key/value cache: for every layer and position, the rotated
//! keys and the values of all heads (`n_embd` wide). Allocated once for the
//! whole context; zero pages are only touched as positions fill.

use half::f16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvType {
    F32,
    F16,
}

impl KvType {
    pub fn parse(s: &str) -> Option<KvType> {
        match s {
            "f32" => Some(KvType::F32),
            "f16" => Some(KvType::F16),
            _ => None,
        }
    }
}

pub enum KvStore {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

pub struct KvCache {
    pub k: KvStore,
    pub v: KvStore,
    pub n_ctx: usize,
    pub width: usize,
}

impl KvStore {
    fn new(ty: KvType, n: usize) -> KvStore {
        match ty {
            KvType::F32 => KvStore::F32(vec![0.0; n]),
            KvType::F16 => KvStore::F16(vec![f16::ZERO; n]),
        }
    }

    pub fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            KvStore::F32(v) => v[at..at + src.len()].copy_from_slice(src),
            KvStore::F16(v) => {
                for (d, &s) in v[at..at + src.len()].iter_mut().zip(src) {
                    *d = f16::from_f32(s);
                }
            }
        }
    }
}

impl KvCache {
    pub fn new(ty: KvType, n_layer: usize, n_ctx: usize, width: usize) -> KvCache {
        let n = n_layer * n_ctx * width;
        KvCache {
            k: KvStore::new(ty, n),
            v: KvStore::new(ty, n),
            n_ctx,
            width,
        }
    }

    /// Element offset of (layer, position).
    pub fn at(&self, layer: usize, pos: usize) -> usize {
        (layer * self.n_ctx + pos) * self.width
    }

    pub fn bytes(&self) -> usize {
        let one = |s: &KvStore| match s {
            KvStore::F32(v) => v.len() * 4,
            KvStore::F16(v) => v.len() * 2,
        };
        one(&self.k) + one(&self.v)
    }
}
