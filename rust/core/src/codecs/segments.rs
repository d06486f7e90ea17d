//! Walks a range of elements as runs that share one scale (groups along the last axis) or one row
//! of scales (groups along an earlier axis), so kernels see long contiguous slices.

use crate::format::GroupLayout;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First element (flat, row-major).
    pub start: usize,
    pub len: usize,
    /// Index in scales/mins of the first element's group.
    pub group: usize,
    /// True: every element has its own group (`group + i`); false: all share `group`.
    pub per_element: bool,
}

/// Calls `f` for each segment of `[start, end)`. Coordinates are divided out once and then
/// stepped: at 64-element groups, divisions per segment cost about as much as the kernel.
pub fn for_each_segment(
    layout: &GroupLayout,
    start: usize,
    end: usize,
    mut f: impl FnMut(Segment),
) {
    if start >= end {
        return;
    }
    let l_len = layout.axis_len as usize;
    let q_len = layout.inner as usize;
    let gs = layout.group_size as usize;
    let g_len = layout.groups_along_axis as usize;
    let mut e = start;
    let mut q = e % q_len;
    let mut l = (e / q_len) % l_len;
    let mut p = e / (q_len * l_len);
    // Group along the axis and the position in it.
    let mut kk = l / gs;
    let mut lg = l - kk * gs;
    loop {
        let (len, group, per_element) = if q_len == 1 {
            let group_len = gs.min(l_len - kk * gs);
            ((group_len - lg).min(end - e), p * g_len + kk, false)
        } else {
            ((q_len - q).min(end - e), (p * g_len + kk) * q_len + q, true)
        };
        f(Segment {
            start: e,
            len,
            group,
            per_element,
        });
        e += len;
        if e >= end {
            return;
        }
        // Not at the end, so the segment ran to the end of its group (Q = 1) or of its row.
        q = 0;
        let step = if q_len == 1 { len } else { 1 };
        l += step;
        lg += step;
        if l == l_len {
            (p, l, kk, lg) = (p + 1, 0, 0, 0);
        } else if lg == gs {
            (kk, lg) = (kk + 1, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Segments straight from the spec's coordinates, one element at a time.
    fn reference(layout: &GroupLayout, start: usize, end: usize) -> Vec<Segment> {
        let (l_len, q_len) = (layout.axis_len as usize, layout.inner as usize);
        let (gs, g_len) = (
            layout.group_size as usize,
            layout.groups_along_axis as usize,
        );
        let mut out: Vec<Segment> = Vec::new();
        for e in start..end {
            let (p, l, q) = (e / (l_len * q_len), (e / q_len) % l_len, e % q_len);
            let group = (p * g_len + l / gs) * q_len + q;
            if let Some(s) = out.last_mut() {
                let joins = if q_len == 1 {
                    s.group == group
                } else {
                    q > 0 && s.group + s.len == group
                };
                if joins {
                    s.len += 1;
                    continue;
                }
            }
            out.push(Segment {
                start: e,
                len: 1,
                group,
                per_element: q_len > 1,
            });
        }
        out
    }

    #[test]
    fn segments_match_coordinates() {
        let shapes: [(&[u64], usize, u64); 8] = [
            (&[100], 0, 7),
            (&[5, 64], 1, 64),
            (&[5, 70], 1, 64),
            (&[3, 10, 4], 1, 3),
            (&[9, 6], 0, 4),
            (&[4, 3, 5], 2, 2),
            (&[2, 3], 1, 100),
            (&[7], 0, 1),
        ];
        for (shape, axis, gs) in shapes {
            let layout = GroupLayout::new(shape, axis, gs).unwrap();
            let n = layout.numel() as usize;
            for start in 0..n {
                for end in [start, start + 1, (start + 13).min(n), n] {
                    let mut got = Vec::new();
                    for_each_segment(&layout, start, end, |s| got.push(s));
                    assert_eq!(
                        got,
                        reference(&layout, start, end),
                        "{shape:?} axis {axis} g {gs} [{start}, {end})"
                    );
                }
            }
        }
    }
}
