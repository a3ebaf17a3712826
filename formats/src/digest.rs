//! Content digests: `sha256:<64 lowercase hex>`, parsed at the boundary.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// A sha256 content digest, displayed as `sha256:<hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

/// Read from its text as the document holds it, without a copy of it.
impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, "\"sha256:\" followed by 64 lowercase hex digits")
    }
}

/// Deserializes a `T` from the text `d` holds (as `T::from_str` reads it), borrowed from
/// the document when the format allows: no copy of each digest or mode of a manifest.
pub(crate) fn from_text<'de, D, T>(d: D, expecting: &'static str) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    struct Text<T>(&'static str, std::marker::PhantomData<T>);
    impl<T: FromStr> serde::de::Visitor<'_> for Text<T>
    where
        T::Err: fmt::Display,
    {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<T, E> {
            s.parse().map_err(E::custom)
        }
    }
    d.deserialize_str(Text(expecting, std::marker::PhantomData))
}

/// Written as `sha256:<hex>`, formatted on the stack (a manifest holds one per file).
impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.text().as_str())
    }
}

/// `sha256:<hex>` in a buffer of its own.
struct DigestText([u8; 71]);

impl DigestText {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("ASCII")
    }
}

/// A string that is not `sha256:` followed by 64 lowercase hex digits.
#[derive(Debug, thiserror::Error)]
#[error("invalid digest {0:?}: expected \"sha256:\" followed by 64 lowercase hex digits")]
pub struct InvalidDigest(pub String);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Digest(Sha256::digest(bytes).into())
    }

    /// The raw 32 bytes.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 hex digits, without the algorithm.
    pub fn hex(&self) -> String {
        hex(&self.0)
    }

    fn text(&self) -> DigestText {
        let mut t = [0u8; 71];
        t[..7].copy_from_slice(b"sha256:");
        for (i, b) in self.0.iter().enumerate() {
            t[7 + 2 * i] = HEX_DIGITS[(b >> 4) as usize];
            t[8 + 2 * i] = HEX_DIGITS[(b & 15) as usize];
        }
        DigestText(t)
    }

    /// Parses 64 lowercase hex digits (no algorithm prefix).
    pub fn from_hex(s: &str) -> Result<Self, InvalidDigest> {
        let bad = || InvalidDigest(s.to_owned());
        if s.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
            let (hi, lo) = (HEX_VALUES[pair[0] as usize], HEX_VALUES[pair[1] as usize]);
            if (hi | lo) > 15 {
                return Err(bad());
            }
            out[i] = (hi << 4) | lo;
        }
        Ok(Digest(out))
    }

    /// `sha256-<hex>.sig`, the cosign tag of signatures over this manifest digest.
    pub fn signature_tag(&self) -> String {
        format!("sha256-{}.sig", self.hex())
    }
}

/// The lowercase hex digits, by value.
const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// The value of each lowercase hex digit; 0xff for every other byte. (A manifest holds a
/// digest per file: they are parsed by the ten thousand.)
const HEX_VALUES: [u8; 256] = {
    let mut t = [0xff; 256];
    let mut i = 0;
    while i < 16 {
        t[HEX_DIGITS[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX_DIGITS[(b >> 4) as usize] as char);
        s.push(HEX_DIGITS[(b & 15) as usize] as char);
    }
    s
}

impl FromStr for Digest {
    type Err = InvalidDigest;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix("sha256:") {
            Some(h) => Digest::from_hex(h).map_err(|_| InvalidDigest(s.to_owned())),
            None => Err(InvalidDigest(s.to_owned())),
        }
    }
}

impl TryFrom<String> for Digest {
    type Error = InvalidDigest;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text().as_str())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// Incremental sha256 fed in chunks, counting the bytes it saw.
#[derive(Clone, Default)]
pub struct Hasher {
    inner: Sha256,
    len: u64,
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hasher").field("len", &self.len).finish()
    }
}

impl Hasher {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, bytes: &[u8]) {
        self.inner.update(bytes);
        self.len += bytes.len() as u64;
    }
    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn finish(self) -> Digest {
        Digest(self.inner.finalize().into())
    }
}

/// A writer that hashes every byte that passes through it.
#[derive(Debug)]
pub struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self { inner, hasher: Hasher::new() }
    }
    /// The digest and size of what was written, and the inner writer.
    pub fn finish(self) -> (Digest, u64, W) {
        let len = self.hasher.len();
        (self.hasher.finish(), len, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes every byte read through it.
#[derive(Debug)]
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self { inner, hasher: Hasher::new() }
    }
    /// Bytes read so far.
    pub fn len(&self) -> u64 {
        self.hasher.len()
    }
    pub fn is_empty(&self) -> bool {
        self.hasher.is_empty()
    }
    pub fn finish(self) -> (Digest, u64, R) {
        let len = self.hasher.len();
        (self.hasher.finish(), len, self.inner)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Hashes everything `reader` yields, in 128 KiB chunks.
pub fn sha256_reader<R: Read>(mut reader: R) -> io::Result<(Digest, u64)> {
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
    }
    let len = h.len();
    Ok((h.finish(), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_strictness() {
        let d = Digest::of(b"abc");
        assert_eq!(d.to_string(), "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{d}\""));
        assert_eq!(serde_json::from_str::<Digest>(&format!("\"{d}\"")).unwrap(), d);
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        for bad in [
            "sha256:BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD",
            "sha512:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "sha256:ba78",
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "sha256:../../../../etc/passwd000000000000000000000000000000000000000000",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }

    #[test]
    fn streaming_hash_matches() {
        let data = vec![7u8; 300_000];
        let (d, n) = sha256_reader(&data[..]).unwrap();
        assert_eq!(d, Digest::of(&data));
        assert_eq!(n, 300_000);
    }

    /// Yields `Interrupted` before every chunk, then fails or ends.
    struct Flaky<'a> {
        data: &'a [u8],
        interrupt: bool,
        fail_at_end: bool,
    }

    impl Read for Flaky<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(io::Error::from(io::ErrorKind::Interrupted));
            }
            if self.data.is_empty() {
                return if self.fail_at_end { Err(io::Error::other("disk on fire")) } else { Ok(0) };
            }
            let n = buf.len().min(self.data.len()).min(1000);
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn an_interrupted_reader_hashes_the_same_and_a_failing_one_is_an_error() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let (d, n) = sha256_reader(Flaky { data: &data, interrupt: false, fail_at_end: false }).unwrap();
        assert_eq!((d, n), (Digest::of(&data), 5000));
        let e = sha256_reader(Flaky { data: &data, interrupt: false, fail_at_end: true }).unwrap_err();
        assert_eq!(e.to_string(), "disk on fire");
    }

    /// Takes at most 3 bytes a call.
    struct Trickle(Vec<u8>);

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(3);
            self.0.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn hashing_writer_and_reader_count_only_what_passed() {
        let mut w = HashingWriter::new(Trickle(Vec::new()));
        // One write call passes 3 bytes: only those are hashed.
        assert_eq!(w.write(b"abcdef").unwrap(), 3);
        w.write_all(b"def-and-more").unwrap();
        w.flush().unwrap();
        let (d, n, inner) = w.finish();
        assert_eq!(inner.0, b"abcdef-and-more");
        assert_eq!((d, n), (Digest::of(b"abcdef-and-more"), 15));

        let mut r = HashingReader::new(&b"hello world"[..]);
        assert!(r.is_empty());
        let mut buf = [0u8; 5];
        r.read_exact(&mut buf).unwrap();
        assert_eq!((r.len(), r.is_empty()), (5, false));
        let (d, n, _) = r.finish();
        assert_eq!((d, n), (Digest::of(b"hello"), 5));

        let mut h = Hasher::new();
        assert!(h.is_empty());
        h.update(b"ab");
        h.update(b"c");
        assert_eq!((h.len(), h.is_empty()), (3, false));
        assert_eq!(h.finish(), Digest::of(b"abc"));
    }

    #[test]
    fn hex_forms() {
        let d = Digest::of(b"abc");
        assert_eq!(d.hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(Digest::from_hex(&d.hex()).unwrap(), d);
        assert_eq!(d.signature_tag(), format!("sha256-{}.sig", d.hex()));
        assert_eq!(hex(&[0, 1, 0xab, 0xff]), "0001abff");
        assert_eq!(d.bytes()[0], 0xba);
        for bad in ["", "ba78", &d.hex().to_uppercase(), &format!("{}0", d.hex()), &format!("{}g", &d.hex()[1..])] {
            assert!(Digest::from_hex(bad).is_err(), "{bad:?}");
        }
    }

    /// A writer that refuses to flush, the way a full disk or a closed pipe does.
    struct NoFlush(Vec<u8>);
    impl Write for NoFlush {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::other("disk full"))
        }
    }

    #[test]
    fn a_failing_flush_is_not_hidden_by_the_hashing_writer() {
        let mut w = HashingWriter::new(NoFlush(Vec::new()));
        w.write_all(b"abc").unwrap();
        let e = w.flush().unwrap_err();
        assert_eq!(e.to_string(), "disk full");
    }

    #[test]
    fn debug_output_shows_the_digest_and_the_count() {
        let d = Digest::of(b"abc");
        assert_eq!(format!("{d:?}"), format!("Digest({d})"));
        let mut h = Hasher::new();
        h.update(b"abcd");
        assert_eq!(format!("{h:?}"), "Hasher { len: 4 }");
    }
}
