//! A small, non-executing pickle machine for the `data.pkl` that `torch.save` writes.
//!
//! It understands the opcodes of protocols 2–5 that appear in state dicts and recognises a
//! handful of callables by name (`_rebuild_tensor_v2`, `_rebuild_parameter`,
//! `collections.OrderedDict`); any other callable yields an opaque value, never code. The
//! input is untrusted, so every read is bounds-checked and stack, memo, nesting depth and the
//! work spent copying shared containers are capped.

use std::collections::HashMap;
use std::rc::Rc;

use super::DType;

/// Stack entries; a real 7B state dict peaks at a few dozen.
const MAX_STACK: usize = 1 << 20;
/// Memo entries; torch memoises ~10 objects per tensor.
const MAX_MEMO: usize = 1 << 20;
/// Container nesting; state dicts need 4.
const MAX_DEPTH: u32 = 64;
/// Elements copied when a shared (memoised) container is modified: guards against inputs that
/// make each opcode clone a large list.
const MAX_COPY: u64 = 1 << 26;

#[derive(Clone, Debug)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Seq>),
    List(Rc<Seq>),
    Dict(Rc<Dict>),
    Global(Rc<(String, String)>),
    Storage(Rc<Storage>),
    Tensor(Rc<Tensor>),
    /// Result of a callable we do not model; only an error if a tensor is expected there.
    Opaque(Rc<str>),
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Seq {
    pub items: Vec<Value>,
    depth: u32,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Dict {
    /// Insertion order, as Python keeps it.
    pub items: Vec<(Value, Value)>,
    by_str: HashMap<Rc<str>, usize>,
    depth: u32,
}

#[derive(Debug)]
pub(crate) struct Storage {
    pub dtype: DType,
    pub elem_size: u64,
    pub key: String,
    pub numel: u64,
}

#[derive(Debug)]
pub(crate) struct Tensor {
    pub storage: Rc<Storage>,
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

impl Value {
    fn depth(&self) -> u32 {
        match self {
            Value::Tuple(s) | Value::List(s) => s.depth,
            Value::Dict(d) => d.depth,
            Value::Tensor(_) => 1,
            _ => 0,
        }
    }

    fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) => "int".into(),
            Value::Float(f) => format!("float {f}"),
            Value::Str(_) => "str".into(),
            Value::Bytes(b) => format!("bytes object of length {}", b.len()),
            Value::Tuple(_) => "tuple".into(),
            Value::List(_) => "list".into(),
            Value::Dict(_) => "dict".into(),
            Value::Global(g) => format!("global {}.{}", g.0, g.1),
            Value::Storage(_) => "storage".into(),
            Value::Tensor(_) => "tensor".into(),
            Value::Opaque(s) => format!("object built by {s}"),
        }
    }
}

/// Pickle error: message plus the byte offset of the opcode that failed.
#[derive(Debug)]
pub(crate) struct PickleError {
    pub offset: usize,
    pub message: String,
}

type PResult<T> = std::result::Result<T, String>;

/// Runs the pickle in `data` and returns the object left by STOP.
pub(crate) fn load(data: &[u8]) -> Result<Value, PickleError> {
    let mut vm = Vm {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        copied: 0,
    };
    loop {
        let at = vm.pos;
        match vm.step() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(message) => {
                return Err(PickleError {
                    offset: at,
                    message,
                })
            }
        }
    }
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    copied: u64,
}

impl<'a> Vm<'a> {
    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                format!(
                    "pickle ends inside an opcode argument (needs {n} bytes, {} left)",
                    self.data.len() - self.pos
                )
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn byte(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> PResult<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> PResult<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> PResult<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn len64(&mut self) -> PResult<usize> {
        usize::try_from(self.u64()?).map_err(|_| "length does not fit in memory".to_string())
    }

    fn line(&mut self) -> PResult<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .take(4096)
            .position(|&b| b == b'\n')
            .ok_or("unterminated text argument")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "text argument is not UTF-8")?;
        self.pos += n + 1;
        Ok(s)
    }

    fn push(&mut self, v: Value) -> PResult<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(format!("stack exceeds {MAX_STACK} entries"));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> PResult<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("pop across a MARK".into());
        }
        self.stack
            .pop()
            .ok_or_else(|| "stack underflow".to_string())
    }

    fn top(&mut self) -> PResult<&mut Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("expected an object above the MARK".into());
        }
        self.stack
            .last_mut()
            .ok_or_else(|| "stack underflow".to_string())
    }

    fn pop_mark(&mut self) -> PResult<Vec<Value>> {
        let m = self.marks.pop().ok_or("no MARK on the stack")?;
        Ok(self.stack.split_off(m))
    }

    fn memo_put(&mut self, key: u32) -> PResult<()> {
        let v = self
            .stack
            .last()
            .ok_or("memoising with an empty stack")?
            .clone();
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&key) {
            return Err(format!("memo exceeds {MAX_MEMO} entries"));
        }
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> PResult<()> {
        let v = self
            .memo
            .get(&key)
            .ok_or_else(|| format!("memo key {key} was never stored"))?
            .clone();
        self.push(v)
    }

    fn charge_copy(&mut self, n: usize) -> PResult<()> {
        self.copied += n as u64;
        if self.copied > MAX_COPY {
            return Err("too much copying of shared containers (hostile pickle?)".into());
        }
        Ok(())
    }

    fn seq(items: Vec<Value>) -> PResult<Rc<Seq>> {
        let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
        if depth > MAX_DEPTH {
            return Err(format!("containers nested deeper than {MAX_DEPTH}"));
        }
        Ok(Rc::new(Seq { items, depth }))
    }

    fn int(v: &Value) -> Option<i64> {
        match v {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// Appends to the list on top of the stack (copy-on-write if it is shared via the memo).
    fn extend_list(&mut self, items: Vec<Value>) -> PResult<()> {
        let add_depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
        let mut list = match self.top()? {
            Value::List(l) => std::mem::take(l),
            other => return Err(format!("APPEND to a {}", other.describe())),
        };
        if Rc::strong_count(&list) > 1 {
            self.charge_copy(list.items.len())?;
        }
        let l = Rc::make_mut(&mut list);
        l.depth = l.depth.max(add_depth);
        if l.depth > MAX_DEPTH {
            return Err(format!("containers nested deeper than {MAX_DEPTH}"));
        }
        l.items.extend(items);
        *self.top()? = Value::List(list);
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> PResult<()> {
        if !items.len().is_multiple_of(2) {
            return Err("SETITEMS with an odd number of stack items".into());
        }
        let mut dict = match self.top()? {
            Value::Dict(d) => std::mem::take(d),
            other => return Err(format!("SETITEM on a {}", other.describe())),
        };
        if Rc::strong_count(&dict) > 1 {
            self.charge_copy(dict.items.len())?;
        }
        let d = Rc::make_mut(&mut dict);
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.depth = d.depth.max(1 + k.depth().max(v.depth()));
            if d.depth > MAX_DEPTH {
                return Err(format!("containers nested deeper than {MAX_DEPTH}"));
            }
            // Python semantics: a repeated key replaces the earlier value.
            if let Value::Str(s) = &k {
                if let Some(&i) = d.by_str.get(s) {
                    d.items[i].1 = v;
                    continue;
                }
                d.by_str.insert(s.clone(), d.items.len());
            }
            d.items.push((k, v));
        }
        *self.top()? = Value::Dict(dict);
        Ok(())
    }

    /// Executes one opcode; returns the result at STOP.
    fn step(&mut self) -> PResult<Option<Value>> {
        let op = self
            .byte()
            .map_err(|_| "pickle ends without a STOP opcode".to_string())?;
        match op {
            0x80 => {
                let proto = self.byte()?;
                if proto > 5 {
                    return Err(format!("unsupported pickle protocol {proto}"));
                }
            }
            0x95 => {
                // FRAME: only a read-ahead hint.
                self.u64()?;
            }
            b'.' => {
                let v = self.pop()?;
                return Ok(Some(v));
            }
            b'(' => {
                if self.marks.len() >= MAX_STACK {
                    return Err("too many MARKs".into());
                }
                self.marks.push(self.stack.len());
            }
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.push(v)?;
            }
            b'}' => self.push(Value::Dict(Rc::new(Dict {
                depth: 1,
                ..Dict::default()
            })))?,
            b']' => self.push(Value::List(Self::seq(Vec::new())?))?,
            b')' => self.push(Value::Tuple(Self::seq(Vec::new())?))?,
            b'd' => {
                let items = self.pop_mark()?;
                self.push(Value::Dict(Rc::new(Dict {
                    depth: 1,
                    ..Dict::default()
                })))?;
                self.set_items(items)?;
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.push(Value::List(Self::seq(items)?))?;
            }
            // Sets only occur in exotic pickles; model them as lists.
            0x8f => self.push(Value::List(Self::seq(Vec::new())?))?,
            0x90 => {
                let items = self.pop_mark()?;
                self.extend_list(items)?;
            }
            0x91 => {
                let items = self.pop_mark()?;
                self.push(Value::Tuple(Self::seq(items)?))?;
            }
            b'q' => {
                let k = self.byte()? as u32;
                self.memo_put(k)?;
            }
            b'r' => {
                let k = self.u32()?;
                self.memo_put(k)?;
            }
            0x94 => {
                let k = u32::try_from(self.memo.len()).map_err(|_| "memo full")?;
                self.memo_put(k)?;
            }
            b'h' => {
                let k = self.byte()? as u32;
                self.memo_get(k)?;
            }
            b'j' => {
                let k = self.u32()?;
                self.memo_get(k)?;
            }
            b'X' => {
                let n = self.u32()? as usize;
                self.push_str(n)?;
            }
            0x8c => {
                let n = self.byte()? as usize;
                self.push_str(n)?;
            }
            0x8d => {
                let n = self.len64()?;
                self.push_str(n)?;
            }
            // Protocol 0/1 byte strings (BINSTRING, SHORT_BINSTRING) and protocol 3+ bytes.
            b'T' | b'B' => {
                let n = self.u32()? as usize;
                self.push_bytes(n)?;
            }
            b'U' | b'C' => {
                let n = self.byte()? as usize;
                self.push_bytes(n)?;
            }
            0x8e => {
                let n = self.len64()?;
                self.push_bytes(n)?;
            }
            b'J' => {
                let v = self.u32()? as i32;
                self.push(Value::Int(v as i64))?;
            }
            b'K' => {
                let v = self.byte()?;
                self.push(Value::Int(v as i64))?;
            }
            b'M' => {
                let v = self.u16()?;
                self.push(Value::Int(v as i64))?;
            }
            0x8a => {
                let n = self.byte()? as usize;
                self.push_long(n)?;
            }
            0x8b => {
                let n = self.u32()? as usize;
                self.push_long(n)?;
            }
            b'G' => {
                let b = self.take(8)?;
                let v = f64::from_be_bytes(b.try_into().expect("8 bytes"));
                self.push(Value::Float(v))?;
            }
            b'N' => self.push(Value::None)?,
            0x88 => self.push(Value::Bool(true))?,
            0x89 => self.push(Value::Bool(false))?,
            b't' => {
                let items = self.pop_mark()?;
                self.push(Value::Tuple(Self::seq(items)?))?;
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.push(Value::Tuple(Self::seq(items)?))?;
            }
            b'c' => {
                let module = self.line()?.to_string();
                let name = self.line()?.to_string();
                self.push(Value::Global(Rc::new((module, name))))?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => {
                        self.push(Value::Global(Rc::new((m.to_string(), n.to_string()))))?
                    }
                    _ => return Err("STACK_GLOBAL needs two strings".into()),
                }
            }
            b'R' => {
                let args = self.pop()?;
                let func = self.pop()?;
                let v = reduce(func, args)?;
                self.push(v)?;
            }
            0x81 => {
                let _args = self.pop()?;
                let cls = self.pop()?;
                self.push(Value::Opaque(cls.describe().into()))?;
            }
            0x92 => {
                let _kwargs = self.pop()?;
                let _args = self.pop()?;
                let cls = self.pop()?;
                self.push(Value::Opaque(cls.describe().into()))?;
            }
            b'b' => {
                // BUILD sets an object's attributes (e.g. an OrderedDict's `_metadata`); none of
                // them matter for locating tensors, so the state is dropped.
                self.pop()?;
                self.top()?;
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = persistent_load(&pid)?;
                self.push(v)?;
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(items)?;
            }
            b'a' => {
                let v = self.pop()?;
                self.extend_list(vec![v])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.extend_list(items)?;
            }
            other => {
                return Err(format!(
                    "unsupported or invalid opcode 0x{other:02x} ({:?})",
                    other as char
                ))
            }
        }
        Ok(None)
    }

    fn push_str(&mut self, n: usize) -> PResult<()> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| "string is not valid UTF-8".to_string())?;
        self.push(Value::Str(s.into()))
    }

    fn push_bytes(&mut self, n: usize) -> PResult<()> {
        let b = self.take(n)?;
        self.push(Value::Bytes(b.into()))
    }

    fn push_long(&mut self, n: usize) -> PResult<()> {
        let b = self.take(n)?;
        if n > 8 {
            // Tensor sizes and offsets never need more than 64 bits.
            return Err(format!("{n}-byte integer is too large"));
        }
        let negative = b.last().is_some_and(|&x| x & 0x80 != 0);
        let mut buf = if negative { [0xff; 8] } else { [0; 8] };
        buf[..n].copy_from_slice(b);
        self.push(Value::Int(i64::from_le_bytes(buf)))
    }
}

fn tuple_items(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Tuple(s) | Value::List(s) => Some(&s.items),
        _ => None,
    }
}

fn reduce(func: Value, args: Value) -> PResult<Value> {
    let Value::Global(g) = &func else {
        return Ok(Value::Opaque(func.describe().into()));
    };
    let args = tuple_items(&args).ok_or("REDUCE arguments are not a tuple")?;
    match (g.0.as_str(), g.1.as_str()) {
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            rebuild_tensor(args).map_err(|m| format!("{}.{}: {m}", g.0, g.1))
        }
        ("torch._utils", "_rebuild_parameter")
        | ("torch._utils", "_rebuild_parameter_with_state") => match args.first() {
            Some(t @ Value::Tensor(_)) => Ok(t.clone()),
            _ => Err(format!("{}.{}: first argument is not a tensor", g.0, g.1)),
        },
        ("collections", "OrderedDict") | ("builtins", "dict") if args.is_empty() => {
            Ok(Value::Dict(Rc::new(Dict {
                depth: 1,
                ..Dict::default()
            })))
        }
        _ => Ok(Value::Opaque(format!("{}.{}", g.0, g.1).into())),
    }
}

fn int_tuple(v: &Value, what: &str) -> PResult<Vec<i64>> {
    tuple_items(v)
        .and_then(|items| items.iter().map(Vm::int).collect::<Option<Vec<_>>>())
        .ok_or_else(|| format!("{what} is not a tuple of integers"))
}

fn rebuild_tensor(args: &[Value]) -> PResult<Value> {
    if args.len() < 4 {
        return Err(format!("expected at least 4 arguments, got {}", args.len()));
    }
    let Value::Storage(storage) = &args[0] else {
        return Err(format!(
            "first argument is a {}, not a storage",
            args[0].describe()
        ));
    };
    let offset = Vm::int(&args[1]).ok_or("storage_offset is not an integer")?;
    let size = int_tuple(&args[2], "size")?;
    let stride = int_tuple(&args[3], "stride")?;
    Ok(Value::Tensor(Rc::new(Tensor {
        storage: storage.clone(),
        offset,
        size,
        stride,
    })))
}

/// `('storage', torch.XStorage, key, location, numel)` as written by torch's persistent_id.
fn persistent_load(pid: &Value) -> PResult<Value> {
    let items = tuple_items(pid).ok_or("persistent id is not a tuple")?;
    let [tag, ty, key, _location, numel] = items else {
        return Err(format!(
            "persistent id has {} fields, expected 5",
            items.len()
        ));
    };
    if !matches!(tag, Value::Str(s) if &**s == "storage") {
        return Err("persistent id is not a ('storage', ...) tuple".into());
    }
    let Value::Global(g) = ty else {
        return Err("persistent id's storage type is not a global".into());
    };
    let (dtype, elem_size) = storage_dtype(&g.0, &g.1)
        .ok_or_else(|| format!("unsupported storage type {}.{}", g.0, g.1))?;
    let key = match key {
        Value::Str(s) => s.to_string(),
        Value::Int(i) => i.to_string(),
        _ => return Err("storage key is not a string".into()),
    };
    let numel = Vm::int(numel)
        .and_then(|n| u64::try_from(n).ok())
        .ok_or("storage numel is not a non-negative integer")?;
    Ok(Value::Storage(Rc::new(Storage {
        dtype,
        elem_size,
        key,
        numel,
    })))
}

fn storage_dtype(module: &str, name: &str) -> Option<(DType, u64)> {
    if module != "torch" {
        return None;
    }
    let other = |s: &str| DType::Other(s.to_string());
    Some(match name {
        "FloatStorage" => (DType::F32, 4),
        "HalfStorage" => (DType::F16, 2),
        "BFloat16Storage" => (DType::BF16, 2),
        "DoubleStorage" => (other("f64"), 8),
        "LongStorage" => (other("i64"), 8),
        "IntStorage" => (other("i32"), 4),
        "ShortStorage" => (other("i16"), 2),
        "CharStorage" => (other("i8"), 1),
        "ByteStorage" => (other("u8"), 1),
        "BoolStorage" => (other("bool"), 1),
        "ComplexFloatStorage" => (other("c64"), 8),
        "ComplexDoubleStorage" => (other("c128"), 16),
        _ => return None,
    })
}

/// Interprets the unpickled object as a state dict: `(name, tensor)` pairs in file order.
pub(crate) fn state_dict(v: &Value) -> Result<Vec<(String, Rc<Tensor>)>, String> {
    let Value::Dict(d) = v else {
        return Err(format!(
            "top-level object is a {}, not a state dict",
            v.describe()
        ));
    };
    let mut out = Vec::with_capacity(d.items.len());
    for (k, v) in &d.items {
        let Value::Str(name) = k else {
            return Err(format!(
                "state dict key is a {}, not a string",
                k.describe()
            ));
        };
        match v {
            Value::Tensor(t) => out.push((name.to_string(), t.clone())),
            other => {
                return Err(format!(
                    "entry '{name}' is a {}, not a tensor",
                    other.describe()
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(b: &[u8]) -> Result<Value, PickleError> {
        load(b)
    }

    #[test]
    fn rejects_truncated_and_unknown() {
        assert!(run(b"").unwrap_err().message.contains("STOP"));
        assert!(run(b"\x80\x02}X\xff\xff\xff\x7fab")
            .unwrap_err()
            .message
            .contains("ends inside"));
        let e = run(b"\x80\x02\xfe.").unwrap_err();
        assert_eq!(e.offset, 2);
        assert!(e.message.contains("0xfe"));
    }

    #[test]
    fn memo_and_dict() {
        // {'a': 1, 'b': (1, 'a')} using memo for 'a'
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bK\x01h\x01\x86u.";
        let v = run(p).unwrap();
        let Value::Dict(d) = v else {
            panic!("not a dict")
        };
        assert_eq!(d.items.len(), 2);
        let Value::Tuple(t) = &d.items[1].1 else {
            panic!("not a tuple")
        };
        assert!(matches!(&t.items[1], Value::Str(s) if &**s == "a"));
    }

    #[test]
    fn long1_negative_and_float() {
        let v = run(b"\x8a\x02\x00\xff.").unwrap();
        assert!(matches!(v, Value::Int(-256)));
        let v = run(b"G\x3f\xf0\x00\x00\x00\x00\x00\x00.").unwrap();
        assert!(matches!(v, Value::Float(f) if f == 1.0));
    }

    #[test]
    fn depth_is_bounded() {
        let mut p = vec![b']'];
        p.extend(std::iter::repeat_n(0x85, 1000));
        p.push(b'.');
        assert!(run(&p).unwrap_err().message.contains("nested"));
    }

    #[test]
    fn copy_blowup_is_bounded() {
        // A 1000-element list in the memo, then repeatedly fetched and appended to: each
        // APPEND must copy the shared list.
        let mut p = vec![b']', b'('];
        p.extend(std::iter::repeat_n([b'K', 1], 1000).flatten());
        p.extend_from_slice(b"eq\x00");
        for _ in 0..200_000 {
            p.extend_from_slice(b"h\x00K\x01a0");
        }
        p.push(b'.');
        match run(&p) {
            Err(e) => assert!(e.message.contains("copying"), "{}", e.message),
            Ok(_) => panic!("copy budget not enforced"),
        }
    }
}
