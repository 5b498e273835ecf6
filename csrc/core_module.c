/*
 * rabit._core: the same C kernels for NumPy, with no torch anywhere (CPython + NumPy C API).
 * Arrays must already have the documented dtype (float32 data, uint32 packed words): a silent
 * cast would change results, so a wrong dtype raises TypeError naming the argument and the fix.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include "../kernels/rabit_format.h"
#include "../kernels/rabit_kernels.h"

#ifndef RABIT_SOURCE_HASH
#define RABIT_SOURCE_HASH "unknown"
#endif

/* A C-contiguous view (or copy) of obj with exactly dtype `type` and ndim in [lo, hi]; NULL + exception. */
static PyArrayObject *rabit_array(const char *op, const char *name, PyObject *obj, int type, int lo, int hi) {
    PyArrayObject *arr;
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected %s to be a numpy array, got %s", op, name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    arr = (PyArrayObject *)obj;
    if (PyArray_TYPE(arr) != type) {
        PyArray_Descr *want = PyArray_DescrFromType(type);
        PyErr_Format(PyExc_TypeError, "%s: expected %s to have dtype %c%d, got %c%d; convert it with .astype(...)", op,
                     name, want->kind, (int)PyDataType_ELSIZE(want), PyArray_DESCR(arr)->kind,
                     (int)PyDataType_ELSIZE(PyArray_DESCR(arr)));
        Py_DECREF(want);
        return NULL;
    }
    if (PyArray_NDIM(arr) < lo || PyArray_NDIM(arr) > hi) {
        if (lo == hi)
            PyErr_Format(PyExc_ValueError, "%s: expected a %d-D %s, got %d-D", op, lo, name, PyArray_NDIM(arr));
        else
            PyErr_Format(PyExc_ValueError, "%s: expected %s with %d to %d dimensions, got %d-D", op, name, lo, hi,
                         PyArray_NDIM(arr));
        return NULL;
    }
    /* native byte order too: a '>f4' array would otherwise pass the dtype check and be read (or written) as
       native floats */
    return (PyArrayObject *)PyArray_FROM_OF(obj, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_NOTSWAPPED);
}

static int rabit_fail(const char *op, rabit_status s) {
    if (s == RABIT_OK) return 0;
    PyErr_Format(s == RABIT_ERR_NOMEM ? PyExc_MemoryError : PyExc_ValueError, "%s: %s", op, rabit_status_string(s));
    return 1;
}

/* Shape checks of g [K, out] and h [K, in]. */
static int rabit_check_scales(const char *op, PyArrayObject *g, PyArrayObject *h, npy_intp out, npy_intp in) {
    npy_intp K = PyArray_DIM(g, 0);
    if (K < 1 || K > RABIT_MAX_K) {
        PyErr_Format(PyExc_ValueError, "%s: g has K=%zd paths; rabit supports K=1..%d", op, (Py_ssize_t)K, RABIT_MAX_K);
        return 1;
    }
    if (PyArray_DIM(h, 0) != K || PyArray_DIM(g, 1) != out || PyArray_DIM(h, 1) != in) {
        PyErr_Format(PyExc_ValueError, "%s: g is [%zd, %zd] and h is [%zd, %zd] but the layer needs g [K, %zd] and "
                     "h [K, %zd]", op, (Py_ssize_t)K, (Py_ssize_t)PyArray_DIM(g, 1), (Py_ssize_t)PyArray_DIM(h, 0),
                     (Py_ssize_t)PyArray_DIM(h, 1), (Py_ssize_t)out, (Py_ssize_t)in);
        return 1;
    }
    return 0;
}

/* NaN or Inf in a float32 array: named, as the torch ops do, instead of filling the result with NaN. */
static int rabit_check_finite(const char *op, const char *name, PyArrayObject *a) {
    const float *p = (const float *)PyArray_DATA(a);
    npy_intp i, n = PyArray_SIZE(a);
    for (i = 0; i < n; i++) {
        if (!isfinite(p[i])) {
            PyErr_Format(PyExc_ValueError, "%s: %s contains NaN or Inf", op, name);
            return 1;
        }
    }
    return 0;
}

static PyObject *core_pack_signs(PyObject *self, PyObject *args) {
    const char *op = "rabit._core.pack_signs";
    PyObject *obj, *res = NULL;
    PyArrayObject *s;
    npy_intp dims[NPY_MAXDIMS];
    int nd, i;
    (void)self;
    if (!PyArg_ParseTuple(args, "O", &obj)) return NULL;
    if (!(s = rabit_array(op, "signs", obj, NPY_FLOAT32, 1, NPY_MAXDIMS))) return NULL;
    nd = PyArray_NDIM(s);
    for (i = 0; i < nd; i++) dims[i] = PyArray_DIM(s, i);
    if (dims[nd - 1] < 1) {
        PyErr_Format(PyExc_ValueError, "%s: the last dimension (in-features) is empty", op);
        goto done;
    }
    dims[nd - 1] = RABIT_WORDS(PyArray_DIM(s, nd - 1));
    res = PyArray_SimpleNew(nd, dims, NPY_UINT32);
    if (!res) goto done;
    if (rabit_fail(op, rabit_pack_signs_cpu((const float *)PyArray_DATA(s), PyArray_SIZE(s) / PyArray_DIM(s, nd - 1),
                                            PyArray_DIM(s, nd - 1), (rabit_word_t *)PyArray_DATA((PyArrayObject *)res))))
        Py_CLEAR(res);
done:
    Py_DECREF(s);
    return res;
}

static PyObject *core_unpack_signs(PyObject *self, PyObject *args) {
    const char *op = "rabit._core.unpack_signs";
    PyObject *obj, *res = NULL;
    PyArrayObject *p;
    Py_ssize_t in;
    npy_intp dims[NPY_MAXDIMS];
    int nd, i;
    (void)self;
    if (!PyArg_ParseTuple(args, "On", &obj, &in)) return NULL;
    if (!(p = rabit_array(op, "packed", obj, NPY_UINT32, 1, NPY_MAXDIMS))) return NULL;
    nd = PyArray_NDIM(p);
    if (in < 1 || PyArray_DIM(p, nd - 1) != RABIT_WORDS(in)) {
        PyErr_Format(PyExc_ValueError, "%s: packed rows hold %zd words but in_features=%zd needs %zd", op,
                     (Py_ssize_t)PyArray_DIM(p, nd - 1), in, (Py_ssize_t)(in < 1 ? 0 : RABIT_WORDS(in)));
        goto done;
    }
    for (i = 0; i < nd; i++) dims[i] = PyArray_DIM(p, i);
    dims[nd - 1] = in;
    res = PyArray_SimpleNew(nd, dims, NPY_FLOAT32);
    if (!res) goto done;
    if (rabit_fail(op, rabit_unpack_signs_cpu((const rabit_word_t *)PyArray_DATA(p), PyArray_SIZE(p) / PyArray_DIM(p, nd - 1),
                                              in, PyArray_DATA((PyArrayObject *)res), RABIT_F32)))
        Py_CLEAR(res);
done:
    Py_DECREF(p);
    return res;
}

static PyObject *core_residual_binarize(PyObject *self, PyObject *args) {
    const char *op = "rabit._core.residual_binarize";
    PyObject *ow, *og, *oh, *what = NULL, *packed = NULL;
    PyArrayObject *w = NULL, *g = NULL, *h = NULL;
    npy_intp out, in, K, pdims[3];
    rabit_status st;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOO", &ow, &og, &oh)) return NULL;
    if (!(w = rabit_array(op, "weight", ow, NPY_FLOAT32, 2, 2))) goto fail;
    if (!(g = rabit_array(op, "g", og, NPY_FLOAT32, 2, 2))) goto fail;
    if (!(h = rabit_array(op, "h", oh, NPY_FLOAT32, 2, 2))) goto fail;
    out = PyArray_DIM(w, 0);
    in = PyArray_DIM(w, 1);
    if (out < 1 || in < 1) {
        PyErr_Format(PyExc_ValueError, "%s: weight is empty", op);
        goto fail;
    }
    if (rabit_check_scales(op, g, h, out, in)) goto fail;
    if (rabit_check_finite(op, "g", g) || rabit_check_finite(op, "h", h)) goto fail;
    K = PyArray_DIM(g, 0);
    pdims[0] = K;
    pdims[1] = out;
    pdims[2] = RABIT_WORDS(in);
    what = PyArray_SimpleNew(2, PyArray_DIMS(w), NPY_FLOAT32);
    packed = PyArray_SimpleNew(3, pdims, NPY_UINT32);
    if (!what || !packed) goto fail;
    Py_BEGIN_ALLOW_THREADS
    st = rabit_residual_binarize_cpu(PyArray_DATA(w), RABIT_F32, (const float *)PyArray_DATA(g),
                                     (const float *)PyArray_DATA(h), K, out, in, PyArray_DATA((PyArrayObject *)what),
                                     RABIT_F32, (rabit_word_t *)PyArray_DATA((PyArrayObject *)packed));
    Py_END_ALLOW_THREADS
    if (rabit_fail(op, st)) goto fail;
    Py_DECREF(w);
    Py_DECREF(g);
    Py_DECREF(h);
    return Py_BuildValue("(NN)", what, packed);
fail:
    Py_XDECREF(w);
    Py_XDECREF(g);
    Py_XDECREF(h);
    Py_XDECREF(what);
    Py_XDECREF(packed);
    return NULL;
}

static PyObject *core_dequantize(PyObject *self, PyObject *args) {
    const char *op = "rabit._core.dequantize";
    PyObject *op_, *og, *oh, *what = NULL, *ret = NULL;
    PyArrayObject *p = NULL, *g = NULL, *h = NULL;
    npy_intp out, in, K, dims[2];
    rabit_status st;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOO", &op_, &og, &oh)) return NULL;
    if (!(p = rabit_array(op, "packed", op_, NPY_UINT32, 3, 3))) goto fail;
    if (!(g = rabit_array(op, "g", og, NPY_FLOAT32, 2, 2))) goto fail;
    if (!(h = rabit_array(op, "h", oh, NPY_FLOAT32, 2, 2))) goto fail;
    K = PyArray_DIM(p, 0);
    out = PyArray_DIM(p, 1);
    in = PyArray_DIM(h, 1);
    if (in < 1) {
        PyErr_Format(PyExc_ValueError, "%s: h has no input features", op);
        goto fail;
    }
    if (rabit_check_scales(op, g, h, out, in)) goto fail;
    if (PyArray_DIM(g, 0) != K || PyArray_DIM(p, 2) != RABIT_WORDS(in)) {
        PyErr_Format(PyExc_ValueError, "%s: packed is [%zd, %zd, %zd] but g, h need [%zd, %zd, %zd]", op, (Py_ssize_t)K,
                     (Py_ssize_t)out, (Py_ssize_t)PyArray_DIM(p, 2), (Py_ssize_t)PyArray_DIM(g, 0), (Py_ssize_t)out,
                     (Py_ssize_t)RABIT_WORDS(in));
        goto fail;
    }
    dims[0] = out;
    dims[1] = in;
    if (!(what = PyArray_SimpleNew(2, dims, NPY_FLOAT32))) goto fail;
    Py_BEGIN_ALLOW_THREADS
    st = rabit_dequantize_cpu((const rabit_word_t *)PyArray_DATA(p), (const float *)PyArray_DATA(g),
                              (const float *)PyArray_DATA(h), K, out, in, PyArray_DATA((PyArrayObject *)what), RABIT_F32);
    Py_END_ALLOW_THREADS
    if (rabit_fail(op, st)) goto fail;
    ret = what, what = NULL;
fail: /* the one exit: the inputs always released, the output only on failure (ret keeps it otherwise) */
    Py_XDECREF(p);
    Py_XDECREF(g);
    Py_XDECREF(h);
    Py_XDECREF(what);
    return ret;
}

/* y = x Ŵᵀ (+ bias) for rabit_cpu_use_gemm(M): Ŵ dequantized a tile of rows at a time (float32, the forward's
   values) into NumPy's float32 matrix product (its BLAS), as the torch binding does with ATen's. 0 or -1 (error
   set). */
static int packed_linear_gemm(const char *op, PyArrayObject *x, PyArrayObject *p, PyArrayObject *g, PyArrayObject *h,
                              PyArrayObject *b, npy_intp K, npy_intp out, npy_intp in, npy_intp M, PyArrayObject *y) {
    const npy_intp rows = rabit_cpu_gemm_tile_rows(out, in);
    npy_intp dims[2] = {rows, in}, o0, m, j;
    PyArrayObject *tile = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    float *yd = (float *)PyArray_DATA(y);
    const float *bd = b ? (const float *)PyArray_DATA(b) : NULL;
    if (!tile) return -1;
    for (o0 = 0; o0 < out; o0 += rows) {
        const npy_intp n = rows < out - o0 ? rows : out - o0;
        PyArrayObject *view, *wt, *prod;
        const float *pd;
        npy_intp dv[2] = {n, in};
        rabit_status st;
        Py_BEGIN_ALLOW_THREADS
        st = rabit_dequantize_rows_cpu((const rabit_word_t *)PyArray_DATA(p), (const float *)PyArray_DATA(g),
                                       (const float *)PyArray_DATA(h), K, out, in, o0, o0 + n, PyArray_DATA(tile),
                                       RABIT_F32);
        Py_END_ALLOW_THREADS
        if (rabit_fail(op, st)) goto fail;
        /* the first n rows of the tile, transposed: [in, n] */
        view = (PyArrayObject *)PyArray_New(&PyArray_Type, 2, dv, NPY_FLOAT32, NULL, PyArray_DATA(tile), 0,
                                            NPY_ARRAY_CARRAY, NULL);
        if (!view) goto fail;
        Py_INCREF(tile); /* the view keeps the tile's memory alive (SetBaseObject steals this reference) */
        if (PyArray_SetBaseObject(view, (PyObject *)tile) < 0) {
            Py_DECREF(view);
            goto fail;
        }
        wt = (PyArrayObject *)PyArray_Transpose(view, NULL);
        Py_DECREF(view);
        if (!wt) goto fail;
        prod = (PyArrayObject *)PyArray_MatrixProduct2((PyObject *)x, (PyObject *)wt, NULL);
        Py_DECREF(wt);
        if (!prod) goto fail;
        pd = (const float *)PyArray_DATA(prod); /* a new C-contiguous [M, n] (or [n]) float32 array */
        for (m = 0; m < M; m++)
            for (j = 0; j < n; j++) yd[m * out + o0 + j] = bd ? pd[m * n + j] + bd[o0 + j] : pd[m * n + j];
        Py_DECREF(prod);
    }
    Py_DECREF(tile);
    return 0;
fail:
    Py_DECREF(tile);
    return -1;
}

/* The float32 y [M, out] of an x [M, in], or [out] of an x [in]. */
static PyObject *rabit_new_y(PyArrayObject *x, npy_intp out) {
    npy_intp dims[2];
    dims[0] = PyArray_NDIM(x) == 1 ? 1 : PyArray_DIM(x, 0);
    dims[1] = out;
    return PyArray_NDIM(x) == 1 ? PyArray_SimpleNew(1, &dims[1], NPY_FLOAT32) : PyArray_SimpleNew(2, dims, NPY_FLOAT32);
}

/* bias (None or float32 [out]): a new reference in *b (NULL for None); 1 + exception on error. */
static int rabit_bias(const char *op, PyObject *ob, npy_intp out, PyArrayObject **b) {
    *b = NULL;
    if (ob == Py_None) return 0;
    if (!(*b = rabit_array(op, "bias", ob, NPY_FLOAT32, 1, 1))) return 1;
    if (PyArray_DIM(*b, 0) != out) {
        PyErr_Format(PyExc_ValueError, "%s: bias has %zd elements but out=%zd", op, (Py_ssize_t)PyArray_DIM(*b, 0),
                     (Py_ssize_t)out);
        Py_CLEAR(*b);
        return 1;
    }
    return 0;
}

static PyObject *core_packed_linear(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"x", "packed", "g", "h", "bias", NULL};
    const char *op = "rabit._core.packed_linear";
    PyObject *ox, *op_, *og, *oh, *ob = Py_None, *y = NULL, *ret = NULL;
    PyArrayObject *x = NULL, *p = NULL, *g = NULL, *h = NULL, *b = NULL;
    npy_intp M, in, K, out;
    rabit_status st;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|O", kwlist, &ox, &op_, &og, &oh, &ob)) return NULL;
    if (!(x = rabit_array(op, "x", ox, NPY_FLOAT32, 1, 2))) goto fail;
    if (!(p = rabit_array(op, "packed", op_, NPY_UINT32, 3, 3))) goto fail;
    if (!(g = rabit_array(op, "g", og, NPY_FLOAT32, 2, 2))) goto fail;
    if (!(h = rabit_array(op, "h", oh, NPY_FLOAT32, 2, 2))) goto fail;
    M = PyArray_NDIM(x) == 1 ? 1 : PyArray_DIM(x, 0);
    in = PyArray_DIM(x, PyArray_NDIM(x) - 1);
    K = PyArray_DIM(p, 0);
    out = PyArray_DIM(p, 1);
    if (in < 1) {
        PyErr_Format(PyExc_ValueError, "%s: x has no input features", op);
        goto fail;
    }
    /* `in` comes from x (the packed words round it up to 32), so a width mismatch is named as x against h */
    if (PyArray_DIM(h, 1) != in) {
        PyErr_Format(PyExc_ValueError, "%s: x has %zd columns but h is [%zd, %zd]; x must be [M, in] or [in] with the "
                     "layer's in=%zd (h is [K, in])", op, (Py_ssize_t)in, (Py_ssize_t)PyArray_DIM(h, 0),
                     (Py_ssize_t)PyArray_DIM(h, 1), (Py_ssize_t)PyArray_DIM(h, 1));
        goto fail;
    }
    if (rabit_check_scales(op, g, h, out, in)) goto fail;
    if (PyArray_DIM(g, 0) != K || PyArray_DIM(p, 2) != RABIT_WORDS(in)) {
        PyErr_Format(PyExc_ValueError, "%s: packed is [%zd, %zd, %zd] but K=%zd and in=%zd need [%zd, %zd, %zd]", op,
                     (Py_ssize_t)K, (Py_ssize_t)out, (Py_ssize_t)PyArray_DIM(p, 2), (Py_ssize_t)PyArray_DIM(g, 0),
                     (Py_ssize_t)in, (Py_ssize_t)PyArray_DIM(g, 0), (Py_ssize_t)out, (Py_ssize_t)RABIT_WORDS(in));
        goto fail;
    }
    if (rabit_bias(op, ob, out, &b)) goto fail;
    if (!(y = rabit_new_y(x, out))) goto fail;
    if (M > 0 && rabit_cpu_use_gemm(M)) {
        if (packed_linear_gemm(op, x, p, g, h, b, K, out, in, M, (PyArrayObject *)y)) goto fail;
        st = RABIT_OK;
    } else {
        Py_BEGIN_ALLOW_THREADS
        st = rabit_packed_linear_cpu(PyArray_DATA(x), RABIT_F32, M, (const rabit_word_t *)PyArray_DATA(p),
                                     PyArray_DATA(g), RABIT_F32, PyArray_DATA(h), RABIT_F32,
                                     b ? (const float *)PyArray_DATA(b) : NULL, K, out, in,
                                     PyArray_DATA((PyArrayObject *)y));
        Py_END_ALLOW_THREADS
    }
    if (rabit_fail(op, st)) goto fail;
    ret = y, y = NULL;
fail: /* the one exit, as in core_dequantize */
    Py_XDECREF(x);
    Py_XDECREF(p);
    Py_XDECREF(g);
    Py_XDECREF(h);
    Py_XDECREF(b);
    Py_XDECREF(y);
    return ret;
}

/* Whether the bytes of two C-contiguous arrays overlap. */
static int rabit_arrays_overlap(PyArrayObject *a, PyArrayObject *b) {
    const char *a0 = (const char *)PyArray_DATA(a), *b0 = (const char *)PyArray_DATA(b);
    const npy_intp na = PyArray_NBYTES(a), nb = PyArray_NBYTES(b);
    return na > 0 && nb > 0 && a0 < b0 + nb && b0 < a0 + na;
}

/* A cache the kernel writes in place: float32, C-contiguous, aligned and writeable as given (a copy would take the
   write away from the caller), 4-D. Returns a new reference; NULL + exception. */
static PyArrayObject *rabit_cache_array(const char *op, const char *name, PyObject *obj) {
    PyArrayObject *arr = rabit_array(op, name, obj, NPY_FLOAT32, 4, 4);
    if (!arr) return NULL;
    if ((PyObject *)arr != obj || !PyArray_ISWRITEABLE(arr)) {
        PyErr_Format(PyExc_ValueError, "%s: %s is written in place, so it must be a writeable, C-contiguous, aligned "
                     "float32 array in native byte order (np.ascontiguousarray gives a copy the caller would not see)",
                     op, name);
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

static PyObject *core_decode_attention(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"q", "k", "v", "k_cache", "v_cache", "cos", "sin", "pos", "scale", NULL};
    const char *op = "rabit._core.decode_attention";
    PyObject *oq, *ok, *ov, *okc, *ovc, *oc, *os_, *oscale = Py_None, *y = NULL, *ret = NULL;
    PyArrayObject *a[7] = {NULL, NULL, NULL, NULL, NULL, NULL, NULL}; /* q k v k_cache v_cache cos sin */
    Py_ssize_t pos;
    npy_intp B, H, D, Hkv, S, i, j;
    double scale;
    rabit_status st;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOn|O", kwlist, &oq, &ok, &ov, &okc, &ovc, &oc, &os_, &pos,
                                     &oscale))
        return NULL;
    if (!(a[0] = rabit_array(op, "q", oq, NPY_FLOAT32, 3, 3))) goto fail;
    if (!(a[1] = rabit_array(op, "k", ok, NPY_FLOAT32, 3, 3))) goto fail;
    if (!(a[2] = rabit_array(op, "v", ov, NPY_FLOAT32, 3, 3))) goto fail;
    if (!(a[3] = rabit_cache_array(op, "k_cache", okc))) goto fail;
    if (!(a[4] = rabit_cache_array(op, "v_cache", ovc))) goto fail;
    if (!(a[5] = rabit_array(op, "cos", oc, NPY_FLOAT32, 2, 2))) goto fail;
    if (!(a[6] = rabit_array(op, "sin", os_, NPY_FLOAT32, 2, 2))) goto fail;
    B = PyArray_DIM(a[0], 0), H = PyArray_DIM(a[0], 1), D = PyArray_DIM(a[0], 2);
    Hkv = PyArray_DIM(a[1], 1), S = PyArray_DIM(a[3], 2);
    if (B < 1 || H < 1 || Hkv < 1 || S < 1) {
        PyErr_Format(PyExc_ValueError, "%s: empty input: q is [%zd, %zd, %zd], k_cache has S=%zd", op, (Py_ssize_t)B,
                     (Py_ssize_t)H, (Py_ssize_t)D, (Py_ssize_t)S);
        goto fail;
    }
    if (D < 2 || D % 2) {
        PyErr_Format(PyExc_ValueError, "%s: the head dimension must be even (rotary halves), got %zd", op, (Py_ssize_t)D);
        goto fail;
    }
    if (H % Hkv) {
        PyErr_Format(PyExc_ValueError, "%s: q has %zd heads, which is not a multiple of k's %zd KV heads", op,
                     (Py_ssize_t)H, (Py_ssize_t)Hkv);
        goto fail;
    }
    for (i = 1; i <= 2; i++)
        if (PyArray_DIM(a[i], 0) != B || PyArray_DIM(a[i], 1) != Hkv || PyArray_DIM(a[i], 2) != D) {
            PyErr_Format(PyExc_ValueError, "%s: k and v must be [B=%zd, Hkv=%zd, D=%zd], got %s [%zd, %zd, %zd]", op,
                         (Py_ssize_t)B, (Py_ssize_t)Hkv, (Py_ssize_t)D, i == 1 ? "k" : "v",
                         (Py_ssize_t)PyArray_DIM(a[i], 0), (Py_ssize_t)PyArray_DIM(a[i], 1),
                         (Py_ssize_t)PyArray_DIM(a[i], 2));
            goto fail;
        }
    for (i = 3; i <= 4; i++)
        if (PyArray_DIM(a[i], 0) != B || PyArray_DIM(a[i], 1) != Hkv || PyArray_DIM(a[i], 2) != S ||
            PyArray_DIM(a[i], 3) != D) {
            PyErr_Format(PyExc_ValueError, "%s: the caches must be [B=%zd, Hkv=%zd, S=%zd, D=%zd]; %s is [%zd, %zd, %zd, "
                         "%zd]", op, (Py_ssize_t)B, (Py_ssize_t)Hkv, (Py_ssize_t)S, (Py_ssize_t)D,
                         i == 3 ? "k_cache" : "v_cache", (Py_ssize_t)PyArray_DIM(a[i], 0),
                         (Py_ssize_t)PyArray_DIM(a[i], 1), (Py_ssize_t)PyArray_DIM(a[i], 2),
                         (Py_ssize_t)PyArray_DIM(a[i], 3));
            goto fail;
        }
    for (i = 5; i <= 6; i++)
        if (PyArray_DIM(a[i], 0) < S || PyArray_DIM(a[i], 1) != D) {
            PyErr_Format(PyExc_ValueError, "%s: cos and sin must be [P >= S=%zd, D=%zd] rotary tables, got %s [%zd, %zd]",
                         op, (Py_ssize_t)S, (Py_ssize_t)D, i == 5 ? "cos" : "sin", (Py_ssize_t)PyArray_DIM(a[i], 0),
                         (Py_ssize_t)PyArray_DIM(a[i], 1));
            goto fail;
        }
    if (pos < 0 || pos >= S) {
        PyErr_Format(PyExc_ValueError, "%s: pos %zd is outside the cache's %zd positions; grow the cache", op, pos,
                     (Py_ssize_t)S);
        goto fail;
    }
    /* the caches are written while the other inputs are read: no two of them may share bytes */
    for (i = 3; i <= 4; i++)
        for (j = 0; j < 7; j++)
            if (j != i && rabit_arrays_overlap(a[i], a[j])) {
                PyErr_Format(PyExc_ValueError, "%s: %s shares memory with another argument; pass separate arrays", op,
                             i == 3 ? "k_cache" : "v_cache");
                goto fail;
            }
    if (oscale == Py_None) {
        scale = 1.0 / sqrt((double)D);
    } else {
        scale = PyFloat_AsDouble(oscale);
        if (scale == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: scale must be a number or None (head_dim ** -0.5), got %s", op,
                         Py_TYPE(oscale)->tp_name);
            goto fail;
        }
        if (!isfinite((float)scale) || !(scale > 0)) {
            /* PyErr_Format has no %g: format the number with PyOS_double_to_string */
            char *txt = PyOS_double_to_string(scale, 'g', 6, 0, NULL);
            PyErr_Format(PyExc_ValueError, "%s: scale must be finite in float32 and > 0, got %s", op,
                         txt ? txt : "?");
            PyMem_Free(txt);
            goto fail;
        }
    }
    {
        npy_intp ydims[3] = {B, H, D};
        const int64_t qs[2] = {H * D, D}, kvs[2] = {Hkv * D, D};
        if (!(y = PyArray_SimpleNew(3, ydims, NPY_FLOAT32))) goto fail;
        Py_BEGIN_ALLOW_THREADS
        st = rabit_decode_attention_cpu(PyArray_DATA(a[0]), qs, PyArray_DATA(a[1]), kvs, PyArray_DATA(a[2]), kvs,
                                        RABIT_F32, B, H, Hkv, D, PyArray_DATA(a[3]), PyArray_DATA(a[4]), S,
                                        PyArray_DATA(a[5]), PyArray_DATA(a[6]), pos, (float)scale,
                                        PyArray_DATA((PyArrayObject *)y));
        Py_END_ALLOW_THREADS
        if (rabit_fail(op, st)) goto fail;
    }
    ret = y, y = NULL;
fail: /* the one exit, as in core_dequantize */
    for (i = 0; i < 7; i++) Py_XDECREF(a[i]);
    Py_XDECREF(y);
    return ret;
}

/* --- int8 classes (opt-in, a relative error of ~1e-2): the packed layers on int8 activation tables, and a dense
   linear (the LM head) on int8 weights and activations; the torch ops rabit.i8_layout, rabit.packed_linear_i8,
   rabit.int8_weight and rabit.int8_linear, with the same checks and bit-identical outputs. --- */

static PyObject *core_i8_layout(PyObject *self, PyObject *args) {
    const char *op = "rabit._core.i8_layout";
    PyObject *op_, *layout = NULL, *ret = NULL;
    PyArrayObject *p = NULL;
    Py_ssize_t in;
    npy_intp K, out, nbytes;
    rabit_status st;
    (void)self;
    if (!PyArg_ParseTuple(args, "On", &op_, &in)) return NULL;
    if (in < 1 || in > PY_SSIZE_T_MAX / 2) {  /* (the bound keeps the word count's arithmetic in range) */
        PyErr_Format(PyExc_ValueError, "%s: in_features must be in [1, %zd], got %zd", op, PY_SSIZE_T_MAX / 2, in);
        return NULL;
    }
    if (!(p = rabit_array(op, "packed", op_, NPY_UINT32, 3, 3))) return NULL;
    K = PyArray_DIM(p, 0);
    out = PyArray_DIM(p, 1);
    if (K < 1 || K > RABIT_MAX_K || out < 1 || PyArray_DIM(p, 2) != RABIT_WORDS(in)) {
        PyErr_Format(PyExc_ValueError, "%s: expected packed [K, out, %zd] (in=%zd) with 1 <= K <= %d and out >= 1, got "
                     "[%zd, %zd, %zd]", op, (Py_ssize_t)RABIT_WORDS(in), in, RABIT_MAX_K, (Py_ssize_t)K,
                     (Py_ssize_t)out, (Py_ssize_t)PyArray_DIM(p, 2));
        goto fail;
    }
    nbytes = (npy_intp)rabit_i8_layout_bytes(K, out, in);
    if (!(layout = PyArray_SimpleNew(1, &nbytes, NPY_UINT8))) goto fail;
    Py_BEGIN_ALLOW_THREADS
    st = rabit_i8_layout_cpu((const rabit_word_t *)PyArray_DATA(p), K, out, in,
                             (uint8_t *)PyArray_DATA((PyArrayObject *)layout));
    Py_END_ALLOW_THREADS
    if (rabit_fail(op, st)) goto fail;
    ret = layout, layout = NULL;
fail: /* the one exit, as in core_dequantize */
    Py_XDECREF(p);
    Py_XDECREF(layout);
    return ret;
}

static PyObject *core_packed_linear_i8(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"x", "layout", "g", "h", "bias", NULL};
    const char *op = "rabit._core.packed_linear_i8";
    PyObject *ox, *ol, *og, *oh, *ob = Py_None, *y = NULL, *ret = NULL;
    PyArrayObject *x = NULL, *l = NULL, *g = NULL, *h = NULL, *b = NULL;
    npy_intp M, in, K, out, want;
    rabit_status st = RABIT_OK;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|O", kwlist, &ox, &ol, &og, &oh, &ob)) return NULL;
    if (!(x = rabit_array(op, "x", ox, NPY_FLOAT32, 1, 2))) goto fail;
    if (!(l = rabit_array(op, "layout", ol, NPY_UINT8, 1, 1))) goto fail;
    if (!(g = rabit_array(op, "g", og, NPY_FLOAT32, 2, 2))) goto fail;
    if (!(h = rabit_array(op, "h", oh, NPY_FLOAT32, 2, 2))) goto fail;
    M = PyArray_NDIM(x) == 1 ? 1 : PyArray_DIM(x, 0);
    in = PyArray_DIM(h, 1);
    out = PyArray_DIM(g, 1);
    K = PyArray_DIM(g, 0);
    if (in < 1 || out < 1) {
        PyErr_Format(PyExc_ValueError, "%s: expected g [K, out] and h [K, in] with out, in >= 1, got g [%zd, %zd] and "
                     "h [%zd, %zd]", op, (Py_ssize_t)K, (Py_ssize_t)out, (Py_ssize_t)PyArray_DIM(h, 0), (Py_ssize_t)in);
        goto fail;
    }
    if (rabit_check_scales(op, g, h, out, in)) goto fail;
    if (PyArray_DIM(x, PyArray_NDIM(x) - 1) != in) {
        PyErr_Format(PyExc_ValueError, "%s: x has %zd columns but h is [%zd, %zd]; x must be [M, in] or [in] with the "
                     "layer's in=%zd", op, (Py_ssize_t)PyArray_DIM(x, PyArray_NDIM(x) - 1), (Py_ssize_t)K,
                     (Py_ssize_t)in, (Py_ssize_t)in);
        goto fail;
    }
    want = (npy_intp)rabit_i8_layout_bytes(K, out, in);
    if (PyArray_DIM(l, 0) != want) {
        PyErr_Format(PyExc_ValueError, "%s: expected layout to be %zd bytes (rabit._core.i8_layout(packed, %zd) of this "
                     "layer), got %zd", op, (Py_ssize_t)want, (Py_ssize_t)in, (Py_ssize_t)PyArray_DIM(l, 0));
        goto fail;
    }
    if (rabit_bias(op, ob, out, &b)) goto fail;
    if (!(y = rabit_new_y(x, out))) goto fail;
    if (M > 0) {
        Py_BEGIN_ALLOW_THREADS
        st = rabit_packed_linear_i8_cpu(PyArray_DATA(x), RABIT_F32, M, (const uint8_t *)PyArray_DATA(l),
                                        PyArray_DATA(g), RABIT_F32, PyArray_DATA(h), RABIT_F32,
                                        b ? (const float *)PyArray_DATA(b) : NULL, K, out, in,
                                        PyArray_DATA((PyArrayObject *)y));
        Py_END_ALLOW_THREADS
    }
    if (rabit_fail(op, st)) goto fail;
    ret = y, y = NULL;
fail: /* the one exit, as in core_dequantize */
    Py_XDECREF(x);
    Py_XDECREF(l);
    Py_XDECREF(g);
    Py_XDECREF(h);
    Py_XDECREF(b);
    Py_XDECREF(y);
    return ret;
}

static PyObject *core_int8_weight(PyObject *self, PyObject *args) {
    const char *op = "rabit._core.int8_weight";
    PyObject *ow, *q = NULL, *d = NULL;
    PyArrayObject *w = NULL;
    npy_intp out, in, qd[4], dd[3];
    rabit_status st;
    (void)self;
    if (!PyArg_ParseTuple(args, "O", &ow)) return NULL;
    if (!(w = rabit_array(op, "weight", ow, NPY_FLOAT32, 2, 2))) return NULL;
    out = PyArray_DIM(w, 0);
    in = PyArray_DIM(w, 1);
    if (out < 1 || in < 1) {
        PyErr_Format(PyExc_ValueError, "%s: expected a non-empty weight [out, in], got [%zd, %zd]", op, (Py_ssize_t)out,
                     (Py_ssize_t)in);
        goto fail;
    }
    qd[0] = dd[0] = (out + 7) / 8;
    qd[1] = dd[1] = (npy_intp)(rabit_int8_in_pad(in) / 32);
    qd[2] = dd[2] = 8;
    qd[3] = 32;
    if (!(q = PyArray_SimpleNew(4, qd, NPY_INT8)) || !(d = PyArray_SimpleNew(3, dd, NPY_FLOAT32))) goto fail;
    Py_BEGIN_ALLOW_THREADS
    st = rabit_int8_weight_cpu(PyArray_DATA(w), RABIT_F32, out, in, (int8_t *)PyArray_DATA((PyArrayObject *)q),
                               (float *)PyArray_DATA((PyArrayObject *)d));
    Py_END_ALLOW_THREADS
    if (st == RABIT_ERR_NONFINITE) {
        PyErr_Format(PyExc_ValueError, "%s: the weight contains NaN or Inf; only finite weights can be quantized", op);
        goto fail;
    }
    if (rabit_fail(op, st)) goto fail;
    Py_DECREF(w);
    return Py_BuildValue("(NN)", q, d);
fail:
    Py_XDECREF(w);
    Py_XDECREF(q);
    Py_XDECREF(d);
    return NULL;
}

static PyObject *core_int8_linear(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"x", "qweight", "scales", "out_features", "bias", NULL};
    const char *op = "rabit._core.int8_linear";
    PyObject *ox, *oq, *os, *ob = Py_None, *y = NULL, *ret = NULL;
    PyArrayObject *x = NULL, *q = NULL, *s = NULL, *b = NULL;
    Py_ssize_t out;
    npy_intp M, in, groups, nb;
    rabit_status st = RABIT_OK;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOn|O", kwlist, &ox, &oq, &os, &out, &ob)) return NULL;
    if (out < 1 || out > PY_SSIZE_T_MAX / 2) {  /* (the bound keeps the group count's arithmetic in range) */
        PyErr_Format(PyExc_ValueError, "%s: out_features must be in [1, %zd], got %zd", op, PY_SSIZE_T_MAX / 2, out);
        return NULL;
    }
    if (!(x = rabit_array(op, "x", ox, NPY_FLOAT32, 1, 2))) goto fail;
    if (!(q = rabit_array(op, "qweight", oq, NPY_INT8, 4, 4))) goto fail;
    if (!(s = rabit_array(op, "scales", os, NPY_FLOAT32, 3, 3))) goto fail;
    M = PyArray_NDIM(x) == 1 ? 1 : PyArray_DIM(x, 0);
    in = PyArray_DIM(x, PyArray_NDIM(x) - 1);
    if (in < 1) {
        PyErr_Format(PyExc_ValueError, "%s: x has no input features", op);
        goto fail;
    }
    groups = (out + 7) / 8;
    nb = (npy_intp)(rabit_int8_in_pad(in) / 32);
    if (PyArray_DIM(q, 0) != groups || PyArray_DIM(q, 1) != nb || PyArray_DIM(q, 2) != 8 || PyArray_DIM(q, 3) != 32 ||
        PyArray_DIM(s, 0) != groups || PyArray_DIM(s, 1) != nb || PyArray_DIM(s, 2) != 8) {
        PyErr_Format(PyExc_ValueError, "%s: expected qweight int8 [%zd, %zd, 8, 32] and scales float32 [%zd, %zd, 8] "
                     "(rabit._core.int8_weight of an [%zd, %zd] weight), got qweight [%zd, %zd, %zd, %zd] and scales "
                     "[%zd, %zd, %zd]", op, (Py_ssize_t)groups, (Py_ssize_t)nb, (Py_ssize_t)groups, (Py_ssize_t)nb,
                     out, (Py_ssize_t)in, (Py_ssize_t)PyArray_DIM(q, 0), (Py_ssize_t)PyArray_DIM(q, 1),
                     (Py_ssize_t)PyArray_DIM(q, 2), (Py_ssize_t)PyArray_DIM(q, 3), (Py_ssize_t)PyArray_DIM(s, 0),
                     (Py_ssize_t)PyArray_DIM(s, 1), (Py_ssize_t)PyArray_DIM(s, 2));
        goto fail;
    }
    if (rabit_bias(op, ob, out, &b)) goto fail;
    if (!(y = rabit_new_y(x, out))) goto fail;
    if (M > 0) {
        Py_BEGIN_ALLOW_THREADS
        st = rabit_int8_linear_cpu(PyArray_DATA(x), RABIT_F32, M, in, (const int8_t *)PyArray_DATA(q),
                                   (const float *)PyArray_DATA(s), b ? (const float *)PyArray_DATA(b) : NULL, out,
                                   PyArray_DATA((PyArrayObject *)y));
        Py_END_ALLOW_THREADS
    }
    if (rabit_fail(op, st)) goto fail;
    ret = y, y = NULL;
fail: /* the one exit, as in core_dequantize */
    Py_XDECREF(x);
    Py_XDECREF(q);
    Py_XDECREF(s);
    Py_XDECREF(b);
    Py_XDECREF(y);
    return ret;
}

static PyObject *core_set_cpu_kernel(PyObject *self, PyObject *arg) {
    const char *name = PyUnicode_AsUTF8(arg);
    rabit_cpu_kernel k;
    (void)self;
    if (!name) return NULL;
    if (rabit_cpu_kernel_from_name(name, &k) != RABIT_OK) {
        PyErr_Format(PyExc_ValueError, "rabit._core.set_cpu_kernel: unknown kernel '%s'; use " RABIT_CPU_KERNEL_NAMES,
                     name);
        return NULL;
    }
    if (rabit_cpu_set_kernel(k) != RABIT_OK) {
        PyErr_Format(PyExc_RuntimeError, "rabit._core.set_cpu_kernel: this CPU cannot run the '%s' kernel", name);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *core_cpu_kernel(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyUnicode_FromString(rabit_cpu_active_kernel_name());
}

static PyMethodDef core_methods[] = {
    {"pack_signs", core_pack_signs, METH_VARARGS, "pack_signs(signs: float32[..., in]) -> uint32[..., ceil(in/32)]"},
    {"unpack_signs", core_unpack_signs, METH_VARARGS, "unpack_signs(packed: uint32[..., words], in_features) -> float32 ±1"},
    {"residual_binarize", core_residual_binarize, METH_VARARGS,
     "residual_binarize(weight f32[out,in], g f32[K,out], h f32[K,in]) -> (what f32[out,in], packed uint32[K,out,words])"},
    {"dequantize", core_dequantize, METH_VARARGS,
     "dequantize(packed uint32[K,out,words], g f32[K,out], h f32[K,in]) -> what f32[out,in] (residual_binarize's)"},
    {"packed_linear", (PyCFunction)(void (*)(void))core_packed_linear, METH_VARARGS | METH_KEYWORDS,
     "packed_linear(x f32[M,in] or [in], packed, g, h, bias=None) -> f32[M,out]: sum_k g_k*(B_k (h_k*x)) + bias"},
    {"decode_attention", (PyCFunction)(void (*)(void))core_decode_attention, METH_VARARGS | METH_KEYWORDS,
     "decode_attention(q f32[B,H,D], k, v f32[B,Hkv,D], k_cache, v_cache f32[B,Hkv,S,D], cos, sin f32[P>=S,D], pos, "
     "scale=None) -> f32[B,H,D]: rotary embedding of q and k, k and v written into the caches at pos (in place), "
     "softmax attention over positions 0..pos (rabit.decode_attention's CPU kernel)"},
    {"i8_layout", core_i8_layout, METH_VARARGS,
     "i8_layout(packed uint32[K,out,words], in_features) -> uint8[bytes]: the packed words rearranged for "
     "packed_linear_i8 (rabit.i8_layout's CPU layout)"},
    {"packed_linear_i8", (PyCFunction)(void (*)(void))core_packed_linear_i8, METH_VARARGS | METH_KEYWORDS,
     "packed_linear_i8(x f32[M,in] or [in], layout, g f32[K,out], h f32[K,in], bias=None) -> f32[M,out]: "
     "packed_linear on int8 activation tables (a relative error of ~1e-2; rabit.packed_linear_i8's kernel)"},
    {"int8_weight", core_int8_weight, METH_VARARGS,
     "int8_weight(weight f32[out,in]) -> (qweight int8[ceil(out/8),nb,8,32], scales f32[ceil(out/8),nb,8]): "
     "a scale per row and 32 columns (rabit.int8_weight)"},
    {"int8_linear", (PyCFunction)(void (*)(void))core_int8_linear, METH_VARARGS | METH_KEYWORDS,
     "int8_linear(x f32[M,in] or [in], qweight, scales, out_features, bias=None) -> f32[M,out]: int8 weights and "
     "activations, float32 sums (rabit.int8_linear's kernel; a relative error of ~1e-2)"},
    {"set_cpu_kernel", core_set_cpu_kernel, METH_O, "Force the CPU packed-GEMV kernel: " RABIT_CPU_KERNEL_NAMES "."},
    {"cpu_kernel", core_cpu_kernel, METH_NOARGS, "The CPU packed-GEMV kernel in use."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef core_module = {PyModuleDef_HEAD_INIT, "_core",
                                         "rabit kernels for NumPy arrays, without torch", -1, core_methods};

PyMODINIT_FUNC PyInit__core(void) {
    PyObject *m;
    import_array();
    m = PyModule_Create(&core_module);
    if (!m) return NULL;
    PyModule_AddIntConstant(m, "FORMAT_VERSION", RABIT_FORMAT_VERSION);
    PyModule_AddIntConstant(m, "WORD_BITS", RABIT_WORD_BITS);
    PyModule_AddIntConstant(m, "CPU_GEMM_MIN_ROWS", RABIT_CPU_GEMM_MIN_ROWS);
    PyModule_AddStringConstant(m, "SOURCE_HASH", RABIT_SOURCE_HASH);
    return m;
}
