//! The memory budget checked at start: the model file, the whole KV pool
//! and the scratch memory must fit in what the system
//! (`MemAvailable`) and the service's cgroup (`MemoryMax=`) leave, or the
//! daemon would be OOM-killed in the middle of a long request instead of
//! refusing to start with the numbers in hand.

use crate::model::forward::scratch_bytes;
use crate::model::KvPool;
use crate::model::{KvType, Model};
use crate::procfs;

/// The daemon itself beyond its buffers: tokenizer, threads' stacks, allocator.
const RUNTIME_BYTES: u64 = 64 << 20;

pub struct Budget {
    pub model: u64,
    pub kv: u64,
    pub pool_tokens: usize,
    pub scratch: u64,
}

impl Budget {
    pub fn new(model: &Model, pool_tokens: usize, kv_type: KvType) -> Budget {
        let hp = &model.hp;
        Budget {
            model: model.file_bytes(),
            kv: KvPool::full_bytes(kv_type, hp.n_layer, hp.n_embd, pool_tokens),
            pool_tokens,
            scratch: scratch_bytes(hp, pool_tokens.min(hp.context_length)) + RUNTIME_BYTES,
        }
    }

    pub fn total(&self) -> u64 {
        self.model + self.kv + self.scratch
    }

    fn describe(&self) -> String {
        format!(
            "the model ({}) + the KV pool of {} tokens ({}) + scratch and runtime ({}) = {}",
            mib(self.model),
            self.pool_tokens,
            mib(self.kv),
            mib(self.scratch),
            mib(self.total())
        )
    }

    /// `Ok(None)` when it fits, `Ok(Some(why))` when it does not, `Err`
    /// when the limits cannot be read.
    pub fn shortfall(&self) -> Result<Option<String>, String> {
        let need = self.total();
        let mut over = Vec::new();
        let available = procfs::mem_available()?;
        if need > available {
            over.push(format!("MemAvailable is {}", mib(available)));
        }
        if let Some(max) = procfs::cgroup_memory_max()? {
            if need > max {
                over.push(format!(
                    "the cgroup's memory limit (MemoryMax=) is {}",
                    mib(max)
                ));
            }
        }
        if over.is_empty() {
            return Ok(None);
        }
        Ok(Some(format!(
            "memory budget: {} needed, but {}. Lower kv_budget or use kv_type = \"q8_0\", free memory, \
             raise MemoryMax=, or set memory_check = \"warn\" to start anyway",
            self.describe(),
            over.join(" and ")
        )))
    }

    pub fn summary(&self) -> String {
        self.describe()
    }
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes.div_ceil(1 << 20))
}
