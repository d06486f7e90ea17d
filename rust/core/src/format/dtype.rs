//! The dtypes of spec section 3.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    Bool,
    Uint8,
    Int8,
    Uint16,
    Int16,
    Uint32,
    Int32,
    Uint64,
    Int64,
    Float16,
    Bfloat16,
    Float32,
    Float64,
    Float8E4m3fn,
    Float8E5m2,
}

impl DType {
    pub const ALL: [DType; 15] = [
        DType::Bool,
        DType::Uint8,
        DType::Int8,
        DType::Uint16,
        DType::Int16,
        DType::Uint32,
        DType::Int32,
        DType::Uint64,
        DType::Int64,
        DType::Float16,
        DType::Bfloat16,
        DType::Float32,
        DType::Float64,
        DType::Float8E4m3fn,
        DType::Float8E5m2,
    ];

    pub fn itemsize(self) -> usize {
        match self {
            DType::Bool | DType::Uint8 | DType::Int8 | DType::Float8E4m3fn | DType::Float8E5m2 => 1,
            DType::Uint16 | DType::Int16 | DType::Float16 | DType::Bfloat16 => 2,
            DType::Uint32 | DType::Int32 | DType::Float32 => 4,
            DType::Uint64 | DType::Int64 | DType::Float64 => 8,
        }
    }

    /// The spelling used in headers and in the Python API.
    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::Uint8 => "uint8",
            DType::Int8 => "int8",
            DType::Uint16 => "uint16",
            DType::Int16 => "int16",
            DType::Uint32 => "uint32",
            DType::Int32 => "int32",
            DType::Uint64 => "uint64",
            DType::Int64 => "int64",
            DType::Float16 => "float16",
            DType::Bfloat16 => "bfloat16",
            DType::Float32 => "float32",
            DType::Float64 => "float64",
            DType::Float8E4m3fn => "float8_e4m3fn",
            DType::Float8E5m2 => "float8_e5m2",
        }
    }

    pub fn parse(name: &str) -> Option<DType> {
        DType::ALL.iter().copied().find(|d| d.name() == name)
    }

    /// Logical dtypes that the quantized encodings accept (decoded through fp32).
    pub fn is_quantizable_float(self) -> bool {
        matches!(
            self,
            DType::Float16 | DType::Bfloat16 | DType::Float32 | DType::Float64
        )
    }

    /// Dtypes allowed to hold scales and mins.
    pub fn is_scale_dtype(self) -> bool {
        matches!(self, DType::Float16 | DType::Bfloat16 | DType::Float32)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
