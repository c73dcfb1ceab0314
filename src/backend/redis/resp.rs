//! Writing commands in the Redis protocol (RESP): an array of bulk strings, built straight
//! into the buffer a batch is sent from.

/// Appends the decimal digits of `n`.
fn decimal(buf: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[at..]);
}

/// The start of a command of `len` arguments.
pub(super) fn array(buf: &mut Vec<u8>, len: usize) {
    buf.push(b'*');
    decimal(buf, len as u64);
    buf.extend_from_slice(b"\r\n");
}

/// One argument, the concatenation of `parts`.
pub(super) fn bulk(buf: &mut Vec<u8>, parts: &[&[u8]]) {
    buf.push(b'$');
    decimal(buf, parts.iter().map(|p| p.len() as u64).sum());
    buf.extend_from_slice(b"\r\n");
    for p in parts {
        buf.extend_from_slice(p);
    }
    buf.extend_from_slice(b"\r\n");
}

/// One argument, an integer in decimal.
pub(super) fn int(buf: &mut Vec<u8>, n: i64) {
    let mut text = Vec::with_capacity(20);
    if n < 0 {
        text.push(b'-');
    }
    decimal(&mut text, n.unsigned_abs());
    bulk(buf, &[&text]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_packed_in_resp() {
        let mut buf = Vec::new();
        array(&mut buf, 3);
        bulk(&mut buf, &[b"SET"]);
        bulk(&mut buf, &[b"ke", b"y", b""]);
        int(&mut buf, -1_700_000_000_123);
        bulk(&mut buf, &[]);
        int(&mut buf, 0);
        assert_eq!(
            buf,
            b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$14\r\n-1700000000123\r\n$0\r\n\r\n$1\r\n0\r\n"
        );
    }
}
