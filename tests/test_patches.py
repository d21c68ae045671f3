"""The patch grid: cell rule, pixel <-> latent mapping (causal first frame), pooling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_reference import latent_cell_ids, latent_pixels, pixel_cell, pool_loop
from halo_jax.align import patches as P


def test_cell_bounds_rule_and_examples():
    np.testing.assert_array_equal(P.cell_bounds(10, 3), [0, 3, 6, 10])
    np.testing.assert_array_equal(P.cell_bounds(8, 4), [0, 2, 4, 6, 8])
    for n in range(1, 16):
        for g in range(1, n + 1):
            b = P.cell_bounds(n, g)
            ids = P.cell_of_index(n, g)
            assert ids.tolist() == [pixel_cell(i, n, g) for i in range(n)]
            sizes = np.diff(b)
            assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
            # pixel centres fall in their own cell; a boundary position goes to the earlier cell
            assert P.cell_index_of_positions(np.arange(n) + 0.5, n, g).tolist() == ids.tolist()
            interior = b[1:-1]
            assert P.cell_index_of_positions(interior, n, g).tolist() == list(range(g - 1))


def test_cell_bounds_rejects_too_many_cells():
    with pytest.raises(ValueError, match="length 3 into 4 cells"):
        P.cell_bounds(3, 4)


def test_latent_mapping_causal_first_frame_by_hand():
    s = P.WAN_VAE_STRIDES
    assert s.pixel_shape((5, 4, 6)) == (17, 32, 48)
    assert s.latent_shape((17, 32, 48)) == (5, 4, 6)
    assert s.latent_shape((19, 33, 48)) == (5, 4, 6)  # the VAE drops trailing frames / pixels
    np.testing.assert_array_equal(s.pixel_spans(0, 3), [[0, 1], [1, 5], [5, 9]])
    # 17 pixel frames in 2 cells: [0, 8) [8, 17). Latent frames cover {0}, 1-4, 5-8, 9-12, 13-16:
    # frame 2 (5-8) straddles both cells and has 3 of its 4 frames in cell 0.
    assert P.latent_cell_map((5, 4, 6), (2, 2, 3)).ids[0] == (0, 0, 0, 1, 1)
    # 17 frames in 4 cells: [0,4) [4,8) [8,12) [12,17); frame 1 (1-4) splits 3:1 -> cell 0.
    assert P.latent_cell_map((5, 4, 6), (4, 1, 1)).ids[0] == (0, 0, 1, 2, 3)
    # 13 frames in 3 cells: [0,4) [4,8) [8,13)
    m = P.latent_cell_map((4, 4, 6), (3, 2, 3))
    assert m.ids == ((0, 0, 1, 2), (0, 0, 1, 1), (0, 0, 1, 1, 2, 2))
    # a 2:2 straddle goes to the earlier cell: 14 frames (13 dropped) in cells [0,7) [7,14);
    # latent frame 2 covers 5-8: frames 5, 6 in cell 0 and 7, 8 in cell 1 -> cell 0.
    m = P.latent_cell_map((4, 1, 1), (2, 1, 1), pixel_shape=(14, 8, 8))
    assert m.ids[0] == (0, 0, 0, 1)
    # cells [0,4) [4,9): latent frame 1 covers 1-4, three frames in cell 0 -> 0
    m = P.latent_cell_map((3, 1, 1), (2, 1, 1), pixel_shape=(9, 8, 8))
    assert m.ids[0] == (0, 0, 1)
    # a dropped trailing pixel frame still belongs to the last pixel cell: 10 frames, cells [0,5) [5,10)
    m = P.latent_cell_map((3, 1, 1), (2, 1, 1), pixel_shape=(10, 8, 8))
    assert m.ids[0] == (0, 0, 1)


def test_latent_mapping_matches_brute_force_and_majority():
    for lat in [(1, 1, 1), (2, 3, 5), (5, 4, 6), (6, 5, 7), (9, 2, 3)]:
        pix = P.WAN_VAE_STRIDES.pixel_shape(lat)
        for grid in [(1, 1, 1), (2, 1, 2), (3, 2, 3), (4, 3, 5)]:
            try:
                m = P.latent_cell_map(lat, grid)
            except ValueError:
                # the reference must agree that some cell is empty
                ref = latent_cell_ids(lat, grid) if all(g <= n for g, n in zip(grid, pix)) else None
                assert ref is None or any(set(r) != set(range(g)) for r, g in zip(ref, grid))
                continue
            assert [list(i) for i in m.ids] == latent_cell_ids(lat, grid)
            # with cells at least as long as a latent span, the lower-middle rule is the majority rule
            for ax, (n, g) in enumerate(zip(pix, grid)):
                span = 4 if ax == 0 else 8
                if n // g < span:
                    continue
                for k, c in enumerate(m.ids[ax]):
                    cells = [pixel_cell(i, n, g) for i in latent_pixels(ax, k)]
                    counts = np.bincount(cells, minlength=g)
                    assert c == int(np.argmax(counts)), (lat, grid, ax, k)


def test_grid_that_does_not_fit_names_both_shapes():
    with pytest.raises(ValueError, match=r"grid \(5, 2, 3\).*\(5, 4, 6\).*\(17, 32, 48\)"):
        P.latent_cell_map((5, 4, 6), (5, 2, 3))
    with pytest.raises(ValueError, match=r"grid \(1, 5, 1\).*latent elements of shape \(2, 4, 1\)"):
        P.latent_cell_map((2, 4, 1), (1, 5, 1))
    with pytest.raises(ValueError, match=r"grid \(6, 1, 1\) does not fit pixel shape \(5, 8, 8\)"):
        P.latent_cell_map((2, 1, 1), (6, 1, 1))
    with pytest.raises(ValueError, match=r"pixel shape \(20, 8, 8\) encodes to latent shape \(5, 1, 1\)"):
        P.latent_cell_map((4, 1, 1), (1, 1, 1), pixel_shape=(20, 8, 8))
    with pytest.raises(ValueError, match=r"values of shape \(2, 4, 4, 6\) do not match"):
        P.pool_cells(jnp.zeros((2, 4, 4, 6)), P.latent_cell_map((5, 4, 6), (2, 2, 3)))


def test_non_causal_strides():
    s = P.VAEStrides(temporal=2, spatial=4, causal_first_frame=False)
    assert s.pixel_shape((3, 2, 2)) == (6, 8, 8)
    m = P.latent_cell_map((3, 2, 2), (3, 2, 1), strides=s)
    assert m.ids == ((0, 1, 2), (0, 1), (0, 0))
    assert [list(i) for i in m.ids] == latent_cell_ids((3, 2, 2), (3, 2, 1), ts=2, ss=4, causal=False)


@pytest.fixture(scope="module")
def pool_jit():
    return jax.jit(P.pool_cells, static_argnums=1)


@pytest.mark.parametrize("latent,grid,even_axes", [
    ((4, 4, 6), (2, 2, 3), (True, True, True)),     # 13 px frames: cells [0,6) [6,13) -> ids 0,0,1,1
    ((5, 4, 6), (2, 2, 3), (False, True, True)),    # causal first frame makes time uneven
    ((6, 5, 7), (3, 2, 3), (False, False, False)),
])
def test_pool_cells_latent_even_and_uneven_vs_loop(pool_jit, latent, grid, even_axes):
    cells = P.latent_cell_map(latent, grid)
    assert tuple(cells.is_even(ax) for ax in range(3)) == even_axes
    x = np.random.default_rng(0).normal(size=(2, 3) + latent).astype(np.float32)
    got = np.asarray(pool_jit(jnp.asarray(x), cells))
    ref = pool_loop(x.astype(np.float64), [list(i) for i in cells.ids], grid)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # flattened membership matrix (token pooling) gives the same means
    flat = x.reshape(6, -1) @ cells.membership()
    np.testing.assert_allclose(flat.reshape(got.shape), ref, rtol=1e-5, atol=1e-6)
    # expand is the right inverse of pool
    back = P.expand_cells(jnp.asarray(got), cells)
    np.testing.assert_allclose(np.asarray(pool_jit(back, cells)), got, rtol=1e-5, atol=1e-6)
    ids = cells.cell_ids()
    np.testing.assert_allclose(np.asarray(back)[0, 0], got[0, 0].ravel()[ids], rtol=1e-6)


@pytest.mark.parametrize("latent,grid", [((4, 4, 6), (2, 2, 3)), ((6, 5, 7), (3, 2, 3))])
def test_pool_cells_max_is_the_largest_value_of_each_cell(latent, grid):
    """reduce='max' on even and uneven axes against a loop over the cells' members."""
    cells = P.latent_cell_map(latent, grid)
    x = np.random.default_rng(2).normal(size=(2,) + latent).astype(np.float32)
    got = np.asarray(P.pool_cells(jnp.asarray(x), cells, reduce="max"))
    ids = [np.asarray(i) for i in cells.ids]
    ref = np.empty((2,) + grid, np.float32)
    for c in np.ndindex(*grid):
        members = x[:, ids[0] == c[0]][:, :, ids[1] == c[1]][:, :, :, ids[2] == c[2]]
        ref[(slice(None),) + c] = members.reshape(2, -1).max(axis=1)
    np.testing.assert_array_equal(got, ref)
    with pytest.raises(ValueError, match="reduce must be 'mean' or 'max'"):
        P.pool_cells(jnp.asarray(x), cells, reduce="sum")


def test_pool_cells_even_path_is_a_reshape():
    cells = P.latent_cell_map((4, 4, 6), (2, 2, 3))
    jaxpr = str(jax.make_jaxpr(lambda v: P.pool_cells(v, cells))(jnp.zeros((1, 4, 4, 6))))
    assert "dot_general" not in jaxpr
    cells = P.latent_cell_map((5, 4, 6), (2, 2, 3))
    jaxpr = str(jax.make_jaxpr(lambda v: P.pool_cells(v, cells))(jnp.zeros((1, 5, 4, 6))))
    assert jaxpr.count("dot_general") == 1   # only the uneven temporal axis


def test_pool_cells_pixel_grid_uneven_vs_loop():
    x = np.random.default_rng(1).normal(size=(2, 7, 10, 9)).astype(np.float32)
    grid = (3, 4, 2)
    got = np.asarray(P.pool_cells(jnp.asarray(x), grid))
    ids = [[pixel_cell(i, n, g) for i in range(n)] for n, g in zip(x.shape[1:], grid)]
    np.testing.assert_allclose(got, pool_loop(x.astype(np.float64), ids, grid), rtol=1e-5, atol=1e-6)


def test_pixel_box_partitions_the_clip():
    pix, grid = (17, 30, 41), (3, 4, 5)
    owner = np.full(pix, -1)
    for t in range(3):
        for h in range(4):
            for w in range(5):
                (f0, f1), (y0, y1), (x0, x1) = P.pixel_box((t, h, w), grid, pix)
                assert (owner[f0:f1, y0:y1, x0:x1] == -1).all()
                owner[f0:f1, y0:y1, x0:x1] = (t * 4 + h) * 5 + w
    np.testing.assert_array_equal(owner, P.pixel_cell_map(pix, grid).cell_ids())
    with pytest.raises(ValueError, match="out of range"):
        P.pixel_box((3, 0, 0), grid, pix)


def test_token_cell_map_follows_pixel_cells():
    # 8 frames, 224 px, 16x16 SigLIP tokens of 14 px; grid (2, 3, 3)
    m = P.token_cell_map((8, 16, 16), (8, 224, 224), (2, 3, 3))
    for ax, (n_tok, n_px, g) in enumerate([(8, 8, 2), (16, 224, 3), (16, 224, 3)]):
        step = n_px // n_tok
        want = [pixel_cell(j * step + (step - 1) // 2, n_px, g) for j in range(n_tok)]
        assert list(m.ids[ax]) == want
    assert m.membership().shape == (8 * 16 * 16, 18)
    np.testing.assert_allclose(m.membership().sum(axis=0, dtype=np.float64), 1.0, rtol=1e-5)
