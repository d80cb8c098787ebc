//! Streaming GGUF writer. The tensor table (names, shapes, types) is known up
//! front, so offsets are computed before any data is written and tensors are
//! streamed in table order: a converter never holds more than the tensor it
//! is working on.
//!
//! [`GgufWriter::with_checksum`] also records the file's checksum
//! ([`super::checksum`]): everything written is hashed as it goes, with a
//! zero placeholder for the value, which [`GgufWriter::finish_with_checksum`]
//! patches in once the last byte is out.

use super::{align_up, checksum, Value, KEY_ALIGNMENT, MAGIC, VERSION};
use crate::quant::GgmlType;
use std::io::{self, Seek, SeekFrom, Write};
use xxhash_rust::xxh3::Xxh3;

#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    /// Innermost (contiguous) dimension first, as ggml's `ne`.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorSpec {
    pub fn n_bytes(&self) -> u64 {
        let rows: u64 = self.dims[1..].iter().product();
        let row = self
            .ty
            .row_bytes(self.dims[0] as usize)
            .expect("row length fits the block size");
        rows * row as u64
    }
}

pub struct GgufWriter<W: Write> {
    w: W,
    alignment: u64,
    tensors: Vec<TensorSpec>,
    /// Index of the tensor being written and bytes of it still expected.
    current: usize,
    left: u64,
    data_bytes: u64,
    /// Everything written so far (the checksum's value as zeros).
    hash: Xxh3,
    /// Offset of the checksum's value from where the writer started.
    checksum_at: Option<u64>,
}

fn write_str(w: &mut impl Write, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut impl Write, v: &Value) -> io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[*x as u8]),
        Value::String(s) => write_str(w, s),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Array(items) => {
            let elem = items.first().map_or(super::value_type::U8, Value::type_id);
            if items.iter().any(|i| i.type_id() != elem) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "GGUF arrays hold one value type",
                ));
            }
            w.write_all(&elem.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|i| write_value(w, i))
        }
    }
}

impl<W: Write> GgufWriter<W> {
    /// Writes the header, metadata and tensor table. `metadata` must not
    /// contain `general.alignment`; it is written from `alignment`.
    pub fn new(
        w: W,
        metadata: &[(String, Value)],
        tensors: Vec<TensorSpec>,
        alignment: usize,
    ) -> io::Result<Self> {
        Self::start(w, metadata, tensors, alignment, false)
    }

    fn start(
        w: W,
        metadata: &[(String, Value)],
        tensors: Vec<TensorSpec>,
        alignment: usize,
        with_checksum: bool,
    ) -> io::Result<Self> {
        assert!(alignment.is_power_of_two());
        let alignment = alignment as u64;
        let mut header = Vec::new();
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        // The alignment is always written, so readers never rely on the default.
        let n_kv = metadata.len() as u64 + 1 + u64::from(with_checksum);
        header.extend_from_slice(&n_kv.to_le_bytes());
        write_str(&mut header, KEY_ALIGNMENT)?;
        header.extend_from_slice(&super::value_type::U32.to_le_bytes());
        header.extend_from_slice(&(alignment as u32).to_le_bytes());
        let mut checksum_at = None;
        if with_checksum {
            write_str(&mut header, checksum::KEY)?;
            header.extend_from_slice(&super::value_type::U64.to_le_bytes());
            checksum_at = Some(header.len() as u64);
            header.extend_from_slice(&0u64.to_le_bytes());
        }
        for (k, v) in metadata {
            assert!(
                k != KEY_ALIGNMENT && k != checksum::KEY,
                "{k} is written by the writer"
            );
            write_str(&mut header, k)?;
            header.extend_from_slice(&v.type_id().to_le_bytes());
            write_value(&mut header, v)?;
        }
        let mut offset = 0u64;
        for t in &tensors {
            write_str(&mut header, &t.name)?;
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&t.ty.id().to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offset = align_up(offset + t.n_bytes(), alignment);
        }
        let header_len = header.len() as u64;
        let left = tensors.first().map_or(0, TensorSpec::n_bytes);
        let mut g = GgufWriter {
            w,
            alignment,
            tensors,
            current: 0,
            left,
            data_bytes: 0,
            hash: Xxh3::new(),
            checksum_at,
        };
        g.emit(&header)?;
        g.pad(align_up(header_len, alignment) - header_len)?;
        Ok(g)
    }

    fn emit(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hash.update(bytes);
        self.w.write_all(bytes)
    }

    fn pad(&mut self, n: u64) -> io::Result<()> {
        const ZEROS: [u8; 64] = [0; 64];
        let mut n = n as usize;
        while n > 0 {
            let k = n.min(ZEROS.len());
            self.emit(&ZEROS[..k])?;
            n -= k;
        }
        Ok(())
    }

    /// The tensor the next bytes belong to, if any are still expected.
    pub fn current(&self) -> Option<&TensorSpec> {
        self.tensors.get(self.current)
    }

    /// Appends bytes of the current tensor; after its last byte the writer
    /// pads to the alignment and moves on to the next tensor in the table.
    pub fn write_data(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let Some(t) = self.tensors.get(self.current) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "more tensor data than the table declares",
                ));
            };
            let n = t.n_bytes();
            let k = (bytes.len() as u64).min(self.left) as usize;
            self.emit(&bytes[..k])?;
            bytes = &bytes[k..];
            self.left -= k as u64;
            self.data_bytes += k as u64;
            if self.left == 0 {
                self.pad(align_up(n, self.alignment) - n)?;
                self.current += 1;
                self.left = self
                    .tensors
                    .get(self.current)
                    .map_or(0, TensorSpec::n_bytes);
            }
        }
        Ok(())
    }

    /// Checks every declared tensor was written in full and returns the sink.
    pub fn finish(self) -> io::Result<W> {
        assert!(
            self.checksum_at.is_none(),
            "a checksummed file is finished with finish_with_checksum"
        );
        self.complete()
    }

    fn complete(mut self) -> io::Result<W> {
        if let Some(t) = self.tensors.get(self.current) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tensor '{}' was not written in full", t.name),
            ));
        }
        self.w.flush()?;
        Ok(self.w)
    }

    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }
}

impl<W: Write + Seek> GgufWriter<W> {
    /// As [`GgufWriter::new`], and the file records its checksum.
    pub fn with_checksum(
        mut w: W,
        metadata: &[(String, Value)],
        tensors: Vec<TensorSpec>,
        alignment: usize,
    ) -> io::Result<Self> {
        let base = w.stream_position()?;
        let mut g = Self::start(w, metadata, tensors, alignment, true)?;
        g.checksum_at = g.checksum_at.map(|at| at + base);
        Ok(g)
    }

    /// Finishes the file and writes its checksum into the reserved place;
    /// returns the sink (positioned at the end) and the checksum.
    pub fn finish_with_checksum(mut self) -> io::Result<(W, u64)> {
        let at = self.checksum_at.take().expect("made by with_checksum");
        let value = self.hash.digest();
        let mut w = self.complete()?;
        let end = w.stream_position()?;
        w.seek(SeekFrom::Start(at))?;
        w.write_all(&value.to_le_bytes())?;
        w.seek(SeekFrom::Start(end))?;
        w.flush()?;
        Ok((w, value))
    }
}
