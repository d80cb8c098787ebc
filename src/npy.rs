//! Writing float32 NumPy `.npy` files (format version 1.0), for `eval`'s
//! logits dump.

use std::io::{self, Write};

pub fn write_f32(w: &mut impl Write, shape: &[usize], data: &[f32]) -> io::Result<()> {
    assert_eq!(
        shape.iter().product::<usize>(),
        data.len(),
        "shape matches data"
    );
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_str = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_str}, }}");
    // Magic (6) + version (2) + header length (2) + header, padded with
    // spaces and a final newline to a multiple of 64 bytes.
    let total = (10 + header.len() + 1).div_ceil(64) * 64;
    header.extend(std::iter::repeat_n(' ', total - 10 - header.len() - 1));
    header.push('\n');
    w.write_all(b"\x93NUMPY\x01\x00")?;
    w.write_all(&(header.len() as u16).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    for chunk in data.chunks(1 << 16) {
        w.write_all(bytemuck::cast_slice(chunk))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn header_is_padded_to_64_bytes() {
        let mut buf = Vec::new();
        super::write_f32(&mut buf, &[2, 3], &[0.0; 6]).unwrap();
        let hlen = u16::from_le_bytes([buf[8], buf[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        assert_eq!(buf.len(), 10 + hlen + 24);
        assert!(std::str::from_utf8(&buf[10..10 + hlen])
            .unwrap()
            .contains("'shape': (2, 3)"));
    }
}
