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

/// Calls `f` for each segment of `[start, end)`.
pub fn for_each_segment(
    layout: &GroupLayout,
    start: usize,
    end: usize,
    mut f: impl FnMut(Segment),
) {
    let l_len = layout.axis_len as usize;
    let q_len = layout.inner as usize;
    let gs = layout.group_size as usize;
    let g_len = layout.groups_along_axis as usize;
    let mut e = start;
    while e < end {
        let q = e % q_len;
        let l = (e / q_len) % l_len;
        let p = e / (q_len * l_len);
        let group = (p * g_len + l / gs) * q_len + q;
        if q_len == 1 {
            let group_end = ((l / gs + 1) * gs).min(l_len);
            let len = (group_end - l).min(end - e);
            f(Segment {
                start: e,
                len,
                group,
                per_element: false,
            });
            e += len;
        } else {
            let len = (q_len - q).min(end - e);
            f(Segment {
                start: e,
                len,
                group,
                per_element: true,
            });
            e += len;
        }
    }
}
