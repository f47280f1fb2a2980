/*
 * Optional C loops for SMPU's duplicate-mode data path (mpvpn.fastpath).
 *
 * Same bytes on the wire and the same state changes as the pure-Python path
 * in mpvpn.smpu (which stays the reference and the fallback): these loops
 * only remove the interpreter's per-packet overhead.  Cryptography is not
 * done here: the AEAD's own encrypt/decrypt methods (from `cryptography`)
 * are called through the C API.  No I/O, no clock, no global state.
 *
 * seal_dup(encrypt, session, epoch, seq0, packets, members, sendbuf, mask, targets)
 *     Seal each packet once (DATA, header member 0 in AAD and nonce), give
 *     it sequence number seq0 + i, store (seq, sealed, targets) in
 *     sendbuf[seq & mask] and make one copy per member with the header's
 *     member byte patched.  Returns (runs, nbytes): runs[j] is the list of
 *     datagrams for members[j]; nbytes the size of one sealed datagram summed
 *     over packets.
 *
 * open_run(datagrams, start, member, session, last, skip_lo, skip_hi, cur_epoch,
 *          cur_decrypt, prev_epoch, prev_decrypt, invalid_tag)
 *     Receive datagrams[start:] while they are well-formed sealed DATA of
 *     this session and member that either are stale (seq <= last: a later
 *     copy, dropped before decryption) or come exactly in order
 *     (seq == last + 1) with nothing buffered (the caller's guarantee).
 *     Stops at the first datagram that needs the full path (anything else).
 *     Returns (index, delivered, last, dup, late, rx_bytes, auth_fail)
 *     where index is where it stopped, delivered the plaintexts in order,
 *     last the new highest delivered sequence number, dup/late the stale
 *     copies (late: within skip_lo..skip_hi, the newest range the reorder buffer
 *     gave up; a stale copy below skip_lo stops the loop: the full path tells
 *     late from duplicate there), rx_bytes
 *     the bytes of authentic or stale datagrams, auth_fail the datagrams
 *     whose tag did not verify (not counted anywhere else, changing nothing).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define HLEN 20
#define TAG 16
#define OP_DATA 0x10
#define F_SEALED 0x01
#define VERSION 1

static void put_be32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static void put_be64(unsigned char *p, uint64_t v) {
    for (int i = 7; i >= 0; i--) { p[i] = v & 0xff; v >>= 8; }
}

static uint64_t get_be64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return v;
}

static PyObject *
seal_dup(PyObject *self, PyObject *args)
{
    PyObject *encrypt, *packets, *sendbuf, *targets;
    unsigned long session;
    int epoch;
    unsigned long long seq0, mask;
    Py_buffer members;
    if (!PyArg_ParseTuple(args, "OkiKO!y*O!KO", &encrypt, &session, &epoch, &seq0,
                          &PyList_Type, &packets, &members, &PyList_Type, &sendbuf, &mask, &targets))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(packets), nm = members.len;
    const unsigned char *mb = members.buf;
    PyObject *runs = PyList_New(nm), *result = NULL;
    unsigned long long total = 0;
    if (runs == NULL)
        goto done;
    for (Py_ssize_t j = 0; j < nm; j++) {
        PyObject *l = PyList_New(n);
        if (l == NULL)
            goto fail;
        PyList_SET_ITEM(runs, j, l);
    }
    if ((unsigned long long)PyList_GET_SIZE(sendbuf) <= mask) {
        PyErr_SetString(PyExc_ValueError, "sendbuf shorter than mask + 1");
        goto fail;
    }
    unsigned char hdr[HLEN], nonce[12];
    hdr[0] = VERSION; hdr[1] = OP_DATA; hdr[2] = 0; hdr[3] = F_SEALED;
    put_be32(hdr + 4, (uint32_t)session);
    hdr[10] = (unsigned char)epoch; hdr[11] = 0;
    memset(nonce, 0, 4);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pkt = PyList_GET_ITEM(packets, i);
        if (!PyBytes_Check(pkt)) {
            PyErr_SetString(PyExc_TypeError, "packets must be bytes");
            goto fail;
        }
        Py_ssize_t plen = PyBytes_GET_SIZE(pkt);
        if (plen > 0xFFFF) {
            PyErr_SetString(PyExc_ValueError, "packet too long");
            goto fail;
        }
        uint64_t seq = seq0 + (uint64_t)i;
        hdr[8] = plen >> 8; hdr[9] = plen & 0xff;
        put_be64(hdr + 12, seq);
        memcpy(nonce + 4, hdr + 12, 8);
        PyObject *nb = PyBytes_FromStringAndSize((const char *)nonce, 12);
        PyObject *ab = PyBytes_FromStringAndSize((const char *)hdr, HLEN);
        if (nb == NULL || ab == NULL) {
            Py_XDECREF(nb); Py_XDECREF(ab);
            goto fail;
        }
        PyObject *cargs[3] = {nb, pkt, ab};
        PyObject *ct = PyObject_Vectorcall(encrypt, cargs, 3, NULL);
        Py_DECREF(nb); Py_DECREF(ab);
        if (ct == NULL)
            goto fail;
        if (!PyBytes_Check(ct)) {
            Py_DECREF(ct);
            PyErr_SetString(PyExc_TypeError, "encrypt did not return bytes");
            goto fail;
        }
        Py_ssize_t clen = PyBytes_GET_SIZE(ct), dlen = HLEN + clen;
        PyObject *sealed = PyBytes_FromStringAndSize(NULL, dlen);
        if (sealed == NULL) {
            Py_DECREF(ct);
            goto fail;
        }
        char *sp = PyBytes_AS_STRING(sealed);
        memcpy(sp, hdr, HLEN);
        memcpy(sp + HLEN, PyBytes_AS_STRING(ct), clen);
        Py_DECREF(ct);
        total += dlen;
        for (Py_ssize_t j = 0; j < nm; j++) {
            PyObject *copy = PyBytes_FromStringAndSize(sp, dlen);
            if (copy == NULL) {
                Py_DECREF(sealed);
                goto fail;
            }
            PyBytes_AS_STRING(copy)[2] = mb[j];
            PyList_SET_ITEM(PyList_GET_ITEM(runs, j), i, copy);
        }
        PyObject *seqo = PyLong_FromUnsignedLongLong(seq);
        PyObject *entry = seqo ? PyTuple_Pack(3, seqo, sealed, targets) : NULL;
        Py_XDECREF(seqo);
        Py_DECREF(sealed);
        if (entry == NULL)
            goto fail;
        if (PyList_SetItem(sendbuf, (Py_ssize_t)(seq & mask), entry) < 0)
            goto fail;
    }
    result = Py_BuildValue("(OK)", runs, total);
fail:
    Py_XDECREF(runs);
done:
    PyBuffer_Release(&members);
    return result;
}

static PyObject *
open_run(PyObject *self, PyObject *args)
{
    PyObject *dgrams, *cur_dec, *prev_dec, *invalid_tag;
    Py_ssize_t start;
    int member, cur_epoch, prev_epoch;
    unsigned long session;
    unsigned long long last, skip_lo, skip_hi;
    if (!PyArg_ParseTuple(args, "O!nikKKKiOiOO", &PyList_Type, &dgrams, &start, &member, &session,
                          &last, &skip_lo, &skip_hi, &cur_epoch, &cur_dec, &prev_epoch, &prev_dec,
                          &invalid_tag))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(dgrams), i = start;
    unsigned long long dup = 0, late = 0, rx_bytes = 0, auth_fail = 0;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    unsigned char nonce[12], aad[HLEN];
    memset(nonce, 0, 4);
    for (; i < n; i++) {
        PyObject *d = PyList_GET_ITEM(dgrams, i);
        if (!PyBytes_Check(d))
            break;
        Py_ssize_t len = PyBytes_GET_SIZE(d);
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(d);
        if (len < HLEN + TAG || p[0] != VERSION || p[1] != OP_DATA || p[2] != member
                || p[3] != F_SEALED || p[11] != 0)
            break;
        uint32_t sid = ((uint32_t)p[4] << 24) | ((uint32_t)p[5] << 16) | ((uint32_t)p[6] << 8) | p[7];
        Py_ssize_t plen = ((Py_ssize_t)p[8] << 8) | p[9];
        if (sid != session || len != HLEN + plen + TAG)
            break;
        uint64_t seq = get_be64(p + 12);
        if (seq <= last) {  /* a later copy: no decryption */
            if (seq > skip_hi)
                dup++;
            else if (seq >= skip_lo)
                late++;
            else
                break;  /* maybe in an older given-up range */
            rx_bytes += len;
            continue;
        }
        if (seq != last + 1)
            break;  /* out of order: the reorder buffer's job */
        PyObject *dec;
        if (p[10] == cur_epoch)
            dec = cur_dec;
        else if (prev_epoch >= 0 && p[10] == prev_epoch && prev_dec != Py_None)
            dec = prev_dec;
        else
            break;  /* unknown epoch: counted by the full path */
        memcpy(nonce + 4, p + 12, 8);
        memcpy(aad, p, HLEN);
        aad[2] = 0;
        PyObject *nb = PyBytes_FromStringAndSize((const char *)nonce, 12);
        PyObject *ab = PyBytes_FromStringAndSize((const char *)aad, HLEN);
        PyObject *cb = PyBytes_FromStringAndSize((const char *)p + HLEN, len - HLEN);
        if (nb == NULL || ab == NULL || cb == NULL) {
            Py_XDECREF(nb); Py_XDECREF(ab); Py_XDECREF(cb);
            Py_DECREF(out);
            return NULL;
        }
        PyObject *cargs[3] = {nb, cb, ab};
        PyObject *pt = PyObject_Vectorcall(dec, cargs, 3, NULL);
        Py_DECREF(nb); Py_DECREF(ab); Py_DECREF(cb);
        if (pt == NULL) {
            if (PyErr_ExceptionMatches(invalid_tag)) {
                PyErr_Clear();
                auth_fail++;
                continue;
            }
            Py_DECREF(out);
            return NULL;
        }
        if (PyList_Append(out, pt) < 0) {
            Py_DECREF(pt);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(pt);
        last = seq;
        rx_bytes += len;
    }
    return Py_BuildValue("(nNKKKKK)", i, out, last, dup, late, rx_bytes, auth_fail);
}

static PyMethodDef methods[] = {
    {"seal_dup", seal_dup, METH_VARARGS, "Seal packets once, one copy per member."},
    {"open_run", open_run, METH_VARARGS, "Receive in-order or stale sealed DATA."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastpath", "SMPU duplicate-mode data path loops (optional).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    return PyModule_Create(&module);
}
