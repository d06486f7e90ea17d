//! Writer -> reader round trips and the reader's refusals, through the public API.

mod common;

use std::collections::BTreeMap;

use qtensors_core::codecs::simd;
use qtensors_core::format::{DType, Encoding, GroupParams};
use qtensors_core::io::{FileWriter, PlannedTensor, QFile};
use qtensors_core::tensor::{encode, Input};
use qtensors_core::Error;

use common::values;

fn affine(bits: u8, group_size: u64, axis: usize) -> Encoding {
    Encoding::Affine(GroupParams {
        bits,
        group_size,
        axis,
        scale_dtype: DType::Float16,
    })
}

fn write(path: &std::path::Path, tensors: &[(&str, Vec<u64>, Encoding, Vec<f32>)]) {
    let plans = tensors
        .iter()
        .map(|(n, s, e, _)| PlannedTensor {
            name: n.to_string(),
            dtype: DType::Float32,
            shape: s.clone(),
            encoding: e.clone(),
        })
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("k".to_string(), "v".to_string());
    let mut w = FileWriter::create(path, plans, meta, 64).unwrap();
    for (i, (_, s, e, v)) in tensors.iter().enumerate() {
        let parts = encode(simd::best(), e, DType::Float32, s, Input::F32(v)).unwrap();
        w.write_tensor(i, &parts).unwrap();
    }
    w.finish().unwrap();
}

fn sample() -> Vec<(&'static str, Vec<u64>, Encoding, Vec<f32>)> {
    vec![
        ("w", vec![70, 33], affine(4, 64, 0), values(70 * 33, 1)),
        ("w3", vec![5, 9], affine(3, 4, 1), values(45, 2)),
        ("b", vec![33], Encoding::Raw, values(33, 3)),
        ("empty", vec![0, 4], affine(4, 64, 1), vec![]),
    ]
}

#[test]
fn roundtrip_and_determinism() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.qtensors"), dir.path().join("b.qtensors"));
    write(&a, &sample());
    write(&b, &sample());
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    // No temporary files are left beside the output.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 2);

    let f = QFile::open(&a, false).unwrap();
    f.verify().unwrap();
    assert_eq!(f.header().metadata["k"], "v");
    assert_eq!(f.data_start() % 64, 0);
    for (name, shape, _, v) in sample() {
        let t = f.tensor(name).unwrap();
        assert_eq!(t.shape, shape);
        let mut out = vec![0u8; v.len() * 4];
        f.decode(simd::best(), t, &mut out).unwrap();
        let got: Vec<f32> = out
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let tol = if name == "b" { 0.0 } else { 0.2 };
        for (x, y) in v.iter().zip(&got) {
            assert!((x - y).abs() <= tol, "{name}: {x} vs {y}");
        }
    }
}

#[test]
fn unfinished_writer_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.qtensors");
    {
        let plans = vec![PlannedTensor {
            name: "w".into(),
            dtype: DType::Float32,
            shape: vec![4],
            encoding: Encoding::Raw,
        }];
        let w = FileWriter::create(&path, plans, BTreeMap::new(), 64).unwrap();
        // Finishing with a part unwritten is refused...
        assert!(matches!(w.finish(), Err(Error::Invalid(_))));
    }
    // ...and nothing remains, under the final name or as a temporary.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn corrupted_part_fails_verification() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.qtensors");
    write(&path, &sample());
    let at = {
        let f = QFile::open(&path, false).unwrap();
        let p = &f.tensor("w").unwrap().parts[1]; // the scales
        f.part_offset(p) + p.length as usize - 1
    };
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[at] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let f = QFile::open(&path, false).unwrap();
    match f.verify() {
        Err(Error::Checksum(m)) => assert!(m.contains("'w' part 'scales'"), "{m}"),
        other => panic!("expected a checksum error, got {other:?}"),
    }
}

#[test]
fn truncated_files_are_refused_at_every_length() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.qtensors");
    write(&path, &sample());
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.qtensors");
    for len in (0..bytes.len()).step_by(7) {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        match QFile::open(&cut, false) {
            Err(Error::Format(_)) => {}
            other => panic!(
                "length {len}: expected a format error, got {:?}",
                other.err()
            ),
        }
    }
}

#[test]
fn newer_versions_and_unknown_encodings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.qtensors");
    write(&path, &sample());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] = 7; // minor version 7
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(QFile::open(&path, false), Err(Error::Unsupported(m)) if m.contains("1.7")));
    assert!(QFile::open(&path, true).is_ok());

    let text =
        String::from_utf8_lossy(&std::fs::read(&path).unwrap()).replace("\"affine\"", "\"nvfp4x\"");
    std::fs::write(&path, text.as_bytes()).unwrap();
    assert!(
        matches!(QFile::open(&path, true).unwrap().header().tensors[0].encoding, Encoding::Unknown { ref name, .. } if name == "nvfp4x")
    );
}
