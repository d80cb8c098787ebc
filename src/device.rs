//! Where the forward pass runs: the CPU kernels, or a CUDA GPU (cargo
//! feature `cuda`). `--device` and the `device` config key choose; `auto`
//! takes the GPU when one is usable and says why when it is not.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    #[default]
    Auto,
}

impl DeviceChoice {
    pub const NAMES: [&'static str; 3] = ["cpu", "cuda", "auto"];

    pub fn name(self) -> &'static str {
        match self {
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
            DeviceChoice::Auto => "auto",
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda),
            "auto" => Ok(DeviceChoice::Auto),
            _ => Err(format!(
                "unknown device '{s}' (expected one of: {})",
                DeviceChoice::NAMES.join(", ")
            )),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The device a loaded model runs on.
pub enum Placement {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::cuda::Gpu>),
}

impl Placement {
    /// `cpu` or `cuda`, for `health` and `bench`.
    pub fn name(&self) -> &'static str {
        match self {
            Placement::Cpu => "cpu",
            #[cfg(feature = "cuda")]
            Placement::Cuda(_) => "cuda",
        }
    }

    /// GPU memory in use on the device (all processes), bytes; `None` on the CPU.
    pub fn gpu_memory_used(&self) -> Option<u64> {
        match self {
            Placement::Cpu => None,
            #[cfg(feature = "cuda")]
            Placement::Cuda(g) => g.memory().ok().map(|(free, total)| total - free),
        }
    }

    /// Bytes of weights on the GPU; `None` on the CPU.
    pub fn weight_bytes(&self) -> Option<u64> {
        match self {
            Placement::Cpu => None,
            #[cfg(feature = "cuda")]
            Placement::Cuda(g) => Some(g.weight_bytes() as u64),
        }
    }

    /// The GPU's peak memory bandwidth, GB/s; `None` on the CPU.
    pub fn peak_bandwidth_gbs(&self) -> Option<f64> {
        match self {
            Placement::Cpu => None,
            #[cfg(feature = "cuda")]
            Placement::Cuda(g) => Some(g.info.bandwidth_gbs),
        }
    }

    #[cfg(feature = "cuda")]
    pub fn gpu(&self) -> Option<&crate::cuda::Gpu> {
        match self {
            Placement::Cpu => None,
            Placement::Cuda(g) => Some(g),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_a_wrong_one_lists_the_choices() {
        for n in DeviceChoice::NAMES {
            assert_eq!(n.parse::<DeviceChoice>().unwrap().name(), n);
        }
        let e = "gpu".parse::<DeviceChoice>().unwrap_err();
        assert!(e.contains("'gpu'") && e.contains("cpu, cuda, auto"), "{e}");
        assert_eq!(DeviceChoice::default(), DeviceChoice::Auto);
    }
}
