/*
 * Optional C loops for SMPU's data path (mpvpn.fastpath): duplicate mode's
 * sealing and receiving, and for aggregate/adaptive the scheduler's flow
 * classification and the sealing of what it decided.
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
 * seal_each(encrypt, session, epoch, seq0, packets, decided, sendbuf, mask)
 *     The same sealing for packets that each go on their own subflows (what
 *     a queueing scheduler decided: aggregate, adaptive): packet i gets
 *     seq0 + i, (seq, sealed, decided[i]) goes into the send buffer and one
 *     copy per subflow in decided[i] (its `member` attribute patched into the
 *     header).  Returns (items, per_subflow): items the (member, datagram)
 *     pairs in order (packet by packet, each packet's subflows in order),
 *     per_subflow a list of (subflow, datagrams, bytes), one per subflow
 *     used, in order of first use.
 *
 * classify(packet, small=128)
 *     mpvpn.core.flows.classify_py, the reference: (flow key, urgent bits)
 *     of one inner IPv4/IPv6 datagram; the same tuple, never an error for
 *     garbage.  The bit values are flows.Urgent's (tests compare both on
 *     random and crafted packets).
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
 *
 * open_new(datagrams, start, member, session, last, skip_lo, skip_hi, buffered,
 *          cur_epoch, cur_decrypt, prev_epoch, prev_decrypt, invalid_tag)
 *     open_run for while the reorder buffer holds something (a gap is
 *     open: at 20 % loss per carrier, nearly always): datagrams[start:] that
 *     are stale (seq <= last, or a key of the dict ``buffered``, the reorder
 *     buffer's) are counted and dropped before decryption as open_run does;
 *     any other is opened, in or out of order.  Stops where open_run does.
 *     Returns (index, opened, dup, late, rx_bytes, auth_fail), opened the
 *     (seq, plaintext) pairs in arrival order: the caller pushes them into
 *     the reorder buffer (which may still find one stale: the same number
 *     twice in the batch).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* The DATA datagram layout.  Its source of truth is mpvpn.wire (and
 * docs/protocol.md); the module exports every one of these as an attribute
 * of the same name and tests/test_fastpath.py checks each against wire.py,
 * so a mismatch fails a test instead of putting wrong bytes on the wire. */
#define HLEN 20          /* wire.HEADER_LEN */
#define TAG 16           /* wire.TAG_LEN */
#define OP_DATA 0x10     /* wire.DATA */
#define F_SEALED 0x01    /* wire.F_SEALED */
#define VERSION 1        /* wire.VERSION */
#define OFF_VERSION 0    /* wire.OFF_VERSION ... */
#define OFF_OPCODE 1
#define OFF_MEMBER 2
#define OFF_FLAGS 3
#define OFF_SESSION 4
#define OFF_LENGTH 8
#define OFF_EPOCH 10
#define OFF_RESERVED 11
#define OFF_SEQ 12

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

/* Seal one packet as DATA under seq (hdr/nonce prepared by the caller): a
 * new reference to the sealed datagram (header member 0), or NULL. */
static PyObject *
seal_one(PyObject *encrypt, unsigned char *hdr, unsigned char *nonce, PyObject *pkt, uint64_t seq)
{
    if (!PyBytes_Check(pkt)) {
        PyErr_SetString(PyExc_TypeError, "packets must be bytes");
        return NULL;
    }
    Py_ssize_t plen = PyBytes_GET_SIZE(pkt);
    if (plen > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "packet too long");
        return NULL;
    }
    hdr[OFF_MEMBER] = 0;
    hdr[OFF_LENGTH] = plen >> 8; hdr[OFF_LENGTH + 1] = plen & 0xff;
    put_be64(hdr + OFF_SEQ, seq);
    memcpy(nonce + 4, hdr + OFF_SEQ, 8);
    PyObject *nb = PyBytes_FromStringAndSize((const char *)nonce, 12);
    PyObject *ab = PyBytes_FromStringAndSize((const char *)hdr, HLEN);
    if (nb == NULL || ab == NULL) {
        Py_XDECREF(nb); Py_XDECREF(ab);
        return NULL;
    }
    PyObject *cargs[3] = {nb, pkt, ab};
    PyObject *ct = PyObject_Vectorcall(encrypt, cargs, 3, NULL);
    Py_DECREF(nb); Py_DECREF(ab);
    if (ct == NULL)
        return NULL;
    if (!PyBytes_Check(ct)) {
        Py_DECREF(ct);
        PyErr_SetString(PyExc_TypeError, "encrypt did not return bytes");
        return NULL;
    }
    Py_ssize_t clen = PyBytes_GET_SIZE(ct);
    PyObject *sealed = PyBytes_FromStringAndSize(NULL, HLEN + clen);
    if (sealed != NULL) {
        char *sp = PyBytes_AS_STRING(sealed);
        memcpy(sp, hdr, HLEN);
        memcpy(sp + HLEN, PyBytes_AS_STRING(ct), clen);
    }
    Py_DECREF(ct);
    return sealed;
}

/* The DATA header every packet of a batch shares (length, sequence number and
 * member are filled in per packet by seal_one) and the nonce's zero prefix. */
static void
init_data_header(unsigned char *hdr, unsigned char *nonce, unsigned long session, int epoch)
{
    hdr[OFF_VERSION] = VERSION; hdr[OFF_OPCODE] = OP_DATA; hdr[OFF_MEMBER] = 0;
    hdr[OFF_FLAGS] = F_SEALED;
    put_be32(hdr + OFF_SESSION, (uint32_t)session);
    hdr[OFF_EPOCH] = (unsigned char)epoch; hdr[OFF_RESERVED] = 0;
    memset(nonce, 0, 4);
}

/* The send buffer's entry for seq: (seq, sealed datagram, targets), for
 * re-sends.  0, or -1 with an exception set. */
static int
keep_for_resend(PyObject *sendbuf, unsigned long long mask, uint64_t seq, PyObject *sealed,
                PyObject *targets)
{
    PyObject *seqo = PyLong_FromUnsignedLongLong(seq);
    PyObject *entry = seqo ? PyTuple_Pack(3, seqo, sealed, targets) : NULL;
    Py_XDECREF(seqo);
    if (entry == NULL)
        return -1;
    return PyList_SetItem(sendbuf, (Py_ssize_t)(seq & mask), entry);
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
    init_data_header(hdr, nonce, session, epoch);
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t seq = seq0 + (uint64_t)i;
        PyObject *sealed = seal_one(encrypt, hdr, nonce, PyList_GET_ITEM(packets, i), seq);
        if (sealed == NULL)
            goto fail;
        Py_ssize_t dlen = PyBytes_GET_SIZE(sealed);
        const char *sp = PyBytes_AS_STRING(sealed);
        total += dlen;
        for (Py_ssize_t j = 0; j < nm; j++) {
            PyObject *copy = PyBytes_FromStringAndSize(sp, dlen);
            if (copy == NULL) {
                Py_DECREF(sealed);
                goto fail;
            }
            PyBytes_AS_STRING(copy)[OFF_MEMBER] = mb[j];
            PyList_SET_ITEM(PyList_GET_ITEM(runs, j), i, copy);
        }
        int r = keep_for_resend(sendbuf, mask, seq, sealed, targets);
        Py_DECREF(sealed);
        if (r < 0)
            goto fail;
    }
    result = Py_BuildValue("(OK)", runs, total);
fail:
    Py_XDECREF(runs);
done:
    PyBuffer_Release(&members);
    return result;
}

/* Decrypt one well-formed sealed DATA datagram p[0:len] of sequence number
 * seq.  Returns the plaintext (new reference); NULL with *why = 1 for an
 * unknown epoch (the full path counts it), 2 for a tag that did not verify
 * (error cleared), 0 for a Python error (set). */
static PyObject *
open_one(const unsigned char *p, Py_ssize_t len, int cur_epoch, PyObject *cur_dec, int prev_epoch,
         PyObject *prev_dec, PyObject *invalid_tag, int *why)
{
    PyObject *dec;
    if (p[OFF_EPOCH] == cur_epoch)
        dec = cur_dec;
    else if (prev_epoch >= 0 && p[OFF_EPOCH] == prev_epoch && prev_dec != Py_None)
        dec = prev_dec;
    else {
        *why = 1;
        return NULL;
    }
    unsigned char nonce[12], aad[HLEN];
    memset(nonce, 0, 4);
    memcpy(nonce + 4, p + OFF_SEQ, 8);
    memcpy(aad, p, HLEN);
    aad[OFF_MEMBER] = 0;
    PyObject *nb = PyBytes_FromStringAndSize((const char *)nonce, 12);
    PyObject *ab = PyBytes_FromStringAndSize((const char *)aad, HLEN);
    PyObject *cb = PyBytes_FromStringAndSize((const char *)p + HLEN, len - HLEN);
    if (nb == NULL || ab == NULL || cb == NULL) {
        Py_XDECREF(nb); Py_XDECREF(ab); Py_XDECREF(cb);
        *why = 0;
        return NULL;
    }
    PyObject *cargs[3] = {nb, cb, ab};
    PyObject *pt = PyObject_Vectorcall(dec, cargs, 3, NULL);
    Py_DECREF(nb); Py_DECREF(ab); Py_DECREF(cb);
    if (pt == NULL) {
        if (PyErr_ExceptionMatches(invalid_tag)) {
            PyErr_Clear();
            *why = 2;
        } else
            *why = 0;
    }
    return pt;
}

/* The checks open_run and open_new share: a well-formed sealed DATA
 * datagram of this session and member?  Sets *seq. */
static int
data_of(PyObject *d, int member, unsigned long session, const unsigned char **pp, Py_ssize_t *lenp,
        uint64_t *seq)
{
    if (!PyBytes_Check(d))
        return 0;
    Py_ssize_t len = PyBytes_GET_SIZE(d);
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(d);
    if (len < HLEN + TAG || p[OFF_VERSION] != VERSION || p[OFF_OPCODE] != OP_DATA
            || p[OFF_MEMBER] != member || p[OFF_FLAGS] != F_SEALED || p[OFF_RESERVED] != 0)
        return 0;
    const unsigned char *ps = p + OFF_SESSION;
    uint32_t sid = ((uint32_t)ps[0] << 24) | ((uint32_t)ps[1] << 16) | ((uint32_t)ps[2] << 8) | ps[3];
    Py_ssize_t plen = ((Py_ssize_t)p[OFF_LENGTH] << 8) | p[OFF_LENGTH + 1];
    if (sid != session || len != HLEN + plen + TAG)
        return 0;
    *pp = p;
    *lenp = len;
    *seq = get_be64(p + OFF_SEQ);
    return 1;
}

/* A number at or below the last one opened: a later copy of it (``dup``), a
 * copy within skip_lo..skip_hi, the newest range the reorder buffer gave up
 * (``late``), or 0 for an older one, which the full path must judge. */
static inline int
count_old_copy(uint64_t seq, unsigned long long skip_lo, unsigned long long skip_hi,
               unsigned long long *dup, unsigned long long *late)
{
    if (seq > skip_hi)
        (*dup)++;
    else if (seq >= skip_lo)
        (*late)++;
    else
        return 0;
    return 1;
}

/* The receive loops' per-datagram start, as _receive_data has it: before any
 * decryption a copy at or below ``last`` (count_old_copy) or already in
 * ``held`` (a duplicate) is counted with its bytes in *rx_bytes; a new one is
 * opened (a tag that does not verify counted in *auth_fail).  With ``full``
 * set, a new number other than last + 1 stops the loop unopened (a flush:
 * the full path).  Returns 0 opened (*seqo, *pt: new references), 1 counted
 * (next datagram), 2 stop here (the full path: an older given-up range, an
 * unknown epoch, a flush), -1 with an exception set. */
struct opener {
    int cur_epoch, prev_epoch;
    PyObject *cur_dec, *prev_dec, *invalid_tag;
    unsigned long long dup, late, rx_bytes, auth_fail;
};

static int
open_copy(struct opener *o, const unsigned char *p, Py_ssize_t len, uint64_t seq,
          unsigned long long last, unsigned long long skip_lo, unsigned long long skip_hi,
          PyObject *held, int full, PyObject **seqo, PyObject **pt)
{
    if (seq <= last) {  /* a later copy: no decryption */
        if (!count_old_copy(seq, skip_lo, skip_hi, &o->dup, &o->late))
            return 2;  /* maybe in an older given-up range */
        o->rx_bytes += len;
        return 1;
    }
    PyObject *k = PyLong_FromUnsignedLongLong(seq);
    if (k == NULL)
        return -1;
    int in = PyDict_Contains(held, k);
    if (in) {  /* buffered already: a later copy (or an error) */
        Py_DECREF(k);
        if (in < 0)
            return -1;
        o->dup++;
        o->rx_bytes += len;
        return 1;
    }
    if (full && seq != last + 1) {
        Py_DECREF(k);
        return 2;
    }
    int why;
    *pt = open_one(p, len, o->cur_epoch, o->cur_dec, o->prev_epoch, o->prev_dec, o->invalid_tag, &why);
    if (*pt == NULL) {
        Py_DECREF(k);
        if (why == 1)
            return 2;  /* unknown epoch: counted by the full path */
        if (why == 2) {
            o->auth_fail++;
            return 1;
        }
        return -1;
    }
    o->rx_bytes += len;
    *seqo = k;
    return 0;
}

static PyObject *
open_new(PyObject *self, PyObject *args)
{
    PyObject *dgrams, *buffered;
    Py_ssize_t start;
    int member;
    unsigned long session;
    unsigned long long last, skip_lo, skip_hi;
    struct opener o = {0, 0, NULL, NULL, NULL, 0, 0, 0, 0};
    if (!PyArg_ParseTuple(args, "O!nikKKKO!iOiOO", &PyList_Type, &dgrams, &start, &member, &session,
                          &last, &skip_lo, &skip_hi, &PyDict_Type, &buffered, &o.cur_epoch, &o.cur_dec,
                          &o.prev_epoch, &o.prev_dec, &o.invalid_tag))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(dgrams), i = start;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (; i < n; i++) {
        const unsigned char *p;
        Py_ssize_t len;
        uint64_t seq;
        if (!data_of(PyList_GET_ITEM(dgrams, i), member, session, &p, &len, &seq))
            break;
        PyObject *seqo, *pt;
        int st = open_copy(&o, p, len, seq, last, skip_lo, skip_hi, buffered, 0, &seqo, &pt);
        if (st < 0)
            goto fail;
        if (st == 2)
            break;
        if (st == 1)
            continue;
        PyObject *pair = PyTuple_Pack(2, seqo, pt);
        Py_DECREF(seqo);
        Py_DECREF(pt);
        if (pair == NULL)
            goto fail;
        if (PyList_Append(out, pair) < 0) {
            Py_DECREF(pair);
            goto fail;
        }
        Py_DECREF(pair);
    }
    return Py_BuildValue("(nNKKKK)", i, out, o.dup, o.late, o.rx_bytes, o.auth_fail);
fail:
    Py_DECREF(out);
    return NULL;
}

/* -- the reorder buffer and the NACK receiver's per-packet bookkeeping ------
 *
 * reorder_push(pairs, start, buf, arrivals, limit, last, skip_lo, skip_hi, tlast, capacity, now)
 *     mpvpn.core.reorder.ReorderBuffer.push_opened_py for pairs[start:] (the
 *     (seq, item) pairs open_new opened), on the buffer's own state, which
 *     ReorderBuffer.push_opened hands over: ``buf`` its dict seq -> item
 *     (updated here), ``arrivals`` its deque of (arrival time, seq)
 *     (appended to, cleared when the buffer runs empty), ``limit`` the
 *     deque's compaction length.  Per pair, check_copy then push: a stale
 *     copy (seq <= last, or buffered) is counted; seq == last + 1 is released
 *     with what follows it in the buffer; anything higher is buffered with
 *     the arrival time max(now, tlast).  Stops before a pair that needs the
 *     Python path (a flush: a new number at a full buffer; a stale copy
 *     below skip_lo, maybe in an older given-up range) and after an append
 *     that takes the deque past ``limit`` (the caller compacts it).  Never
 *     called while numbers given up ahead of the line wait (ReorderBuffer._given).
 *     Returns (index, released, last, tlast, dup, late, accepted, handover):
 *     accepted the (seq, last after it) of each pair taken, as
 *     NackReceiver.on_data_many wants them; handover 1 when it stopped
 *     before pairs[index] for the Python path, 0 when it took everything or
 *     stopped for a compaction.
 *
 * nack_gaps(missing, rx_high, arrivals, send_buffer, track, now)
 *     The per-packet part of NackReceiver.on_data_many_py on its ``missing``
 *     dict (seq -> when noticed; updated here, insertion order kept): for
 *     each (seq, delivered up to) in ``arrivals``, a number above rx_high + 1
 *     notes the gap below it (at most ``track`` numbers missing at once, none
 *     older than seq - send_buffer: the most the peer's send buffer holds,
 *     SessionConfig.send_buffer_max), one at or below rx_high is no longer
 *     missing.  Returns (rx_high, top, noted, untracked): top the highest
 *     seq, noted whether any number was noted missing (the caller sets its
 *     timer once: ``now`` is one value for the batch), untracked the numbers
 *     left out for ``track``.
 */
/* The reorder buffer's state while a C loop pushes into it: its dict and
 * deque (handed over by ReorderBuffer) and X. */
struct reorder_st {
    PyObject *buf, *arrivals, *append, *tobj, *out;  /* tobj: the arrival time stored */
    Py_ssize_t limit, capacity;
    long long last;
    int stored;  /* something was buffered (tlast moves to now) */
};

static int
reorder_open(struct reorder_st *r, PyObject *arrivals, double tlast, PyObject *nowo)
{
    r->arrivals = arrivals;
    r->stored = 0;
    r->out = PyList_New(0);
    r->append = PyObject_GetAttrString(arrivals, "append");
    if (PyFloat_AS_DOUBLE(nowo) < tlast)  /* arrival times stay monotone (ReorderBuffer.push) */
        r->tobj = PyFloat_FromDouble(tlast);
    else {
        r->tobj = nowo;
        Py_INCREF(nowo);
    }
    return r->out != NULL && r->append != NULL && r->tobj != NULL ? 0 : -1;
}

static void
reorder_close(struct reorder_st *r)
{
    Py_XDECREF(r->out);
    Py_XDECREF(r->append);
    Py_XDECREF(r->tobj);
}

/* ReorderBuffer.push for a new number (seq > X, not buffered; seq == X + 1
 * or the buffer has room): released with what follows it in the buffer, or
 * buffered with its arrival time.  1 when buffered and the arrivals deque
 * went past its limit (the caller stops after it: ReorderBuffer compacts),
 * 0, or -1 with an exception set. */
static int
reorder_take(struct reorder_st *r, PyObject *seqo, long long seq, PyObject *item)
{
    if (seq == r->last + 1) {
        if (PyList_Append(r->out, item) < 0)
            return -1;
        r->last = seq;
        if (!PyDict_GET_SIZE(r->buf))
            return 0;
        while (r->last < LLONG_MAX) {
            PyObject *k = PyLong_FromLongLong(r->last + 1);
            if (k == NULL)
                return -1;
            PyObject *nxt = PyDict_GetItemWithError(r->buf, k);  /* borrowed */
            if (nxt == NULL) {
                Py_DECREF(k);
                if (PyErr_Occurred())
                    return -1;
                break;
            }
            Py_INCREF(nxt);
            int e = PyDict_DelItem(r->buf, k);
            Py_DECREF(k);
            if (e < 0 || PyList_Append(r->out, nxt) < 0) {
                Py_DECREF(nxt);
                return -1;
            }
            Py_DECREF(nxt);
            r->last++;
        }
        if (!PyDict_GET_SIZE(r->buf)) {
            PyObject *e = PyObject_CallMethod(r->arrivals, "clear", NULL);
            if (e == NULL)
                return -1;
            Py_DECREF(e);
        }
        return 0;
    }
    if (PyDict_SetItem(r->buf, seqo, item) < 0)
        return -1;
    r->stored = 1;
    PyObject *ent = PyTuple_Pack(2, r->tobj, seqo);
    if (ent == NULL)
        return -1;
    PyObject *e = PyObject_CallOneArg(r->append, ent);
    Py_DECREF(ent);
    if (e == NULL)
        return -1;
    Py_DECREF(e);
    Py_ssize_t len = PyObject_Length(r->arrivals);
    if (len < 0)
        return -1;
    return len > r->limit;
}

/* The NACK receiver's state while a C loop notes gaps: its dict of missing
 * numbers (seq -> when noticed, insertion order kept). */
struct nack_st {
    PyObject *missing, *nowo;
    long long high, top, send_buffer, track, untracked;
    int noted;
};

/* NackReceiver.on_data's per-packet part for DATA seq, after which the
 * reorder buffer has delivered up to ``upto``.  0, or -1 with an exception. */
static int
nack_one(struct nack_st *s, long long seq, long long upto)
{
    if (seq > s->top)
        s->top = seq;
    if (seq > s->high) {
        if (seq > s->high + 1) {  /* NackReceiver._note_gap */
            long long lo = (s->high > upto ? s->high : upto) + 1;
            if (seq - s->send_buffer > lo)
                lo = seq - s->send_buffer;
            long long room = s->track - (long long)PyDict_GET_SIZE(s->missing);
            long long hi = lo + (room > 0 ? room : 0);
            if (hi > seq)
                hi = seq;
            if (hi < seq)
                s->untracked += seq - hi;
            for (long long q = lo; q < hi; q++) {
                PyObject *k = PyLong_FromLongLong(q);
                if (k == NULL)
                    return -1;
                int e = PyDict_SetItem(s->missing, k, s->nowo);
                Py_DECREF(k);
                if (e < 0)
                    return -1;
            }
            if (hi > lo)
                s->noted = 1;
        }
        s->high = seq;
    } else if (PyDict_GET_SIZE(s->missing)) {
        PyObject *k = PyLong_FromLongLong(seq);
        if (k == NULL)
            return -1;
        int e = PyDict_Contains(s->missing, k);
        if (e > 0)
            e = PyDict_DelItem(s->missing, k);
        Py_DECREF(k);
        if (e < 0)
            return -1;
    }
    return 0;
}

/* (seq, last) for the arrivals list: what NackReceiver.on_data_many wants */
static int
append_arrival(PyObject *acc, PyObject *seqo, long long seq, long long last)
{
    PyObject *lo;
    if (seq == last) {
        lo = seqo;
        Py_INCREF(lo);
    } else if ((lo = PyLong_FromLongLong(last)) == NULL)
        return -1;
    PyObject *a = PyTuple_New(2);
    if (a == NULL) {
        Py_DECREF(lo);
        return -1;
    }
    Py_INCREF(seqo);
    PyTuple_SET_ITEM(a, 0, seqo);
    PyTuple_SET_ITEM(a, 1, lo);
    int e = PyList_Append(acc, a);
    Py_DECREF(a);
    return e;
}

static PyObject *
reorder_push(PyObject *self, PyObject *args)
{
    PyObject *pairs, *buf, *arrivals, *nowo;
    Py_ssize_t start, limit, capacity;
    long long last, skip_lo, skip_hi;
    double tlast;
    if (!PyArg_ParseTuple(args, "O!nO!OnLLLdnO!", &PyList_Type, &pairs, &start, &PyDict_Type, &buf,
                          &arrivals, &limit, &last, &skip_lo, &skip_hi, &tlast, &capacity,
                          &PyFloat_Type, &nowo))
        return NULL;
    double now = PyFloat_AS_DOUBLE(nowo);
    Py_ssize_t n = PyList_GET_SIZE(pairs), i = start;
    unsigned long long dup = 0, late = 0;
    int handover = 0;  /* stopped before pairs[i] for the Python path */
    struct reorder_st r = {buf, NULL, NULL, NULL, NULL, limit, capacity, last, 0};
    PyObject *acc = PyList_New(0), *result = NULL;
    if (reorder_open(&r, arrivals, tlast, nowo) < 0 || acc == NULL)
        goto done;
    for (; i < n; i++) {
        PyObject *pair = PyList_GET_ITEM(pairs, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "pairs must hold (seq, item) tuples");
            goto done;
        }
        PyObject *seqo = PyTuple_GET_ITEM(pair, 0), *item = PyTuple_GET_ITEM(pair, 1);
        int overflow;
        long long seq = PyLong_AsLongLongAndOverflow(seqo, &overflow);
        if (seq == -1 && PyErr_Occurred())
            goto done;
        if (overflow || (seq > 0 && seq == LLONG_MAX)) {
            handover = 1;  /* the Python path knows big numbers */
            break;
        }
        if (seq <= r.last) {
            if (seq > skip_hi)
                dup++;
            else if (seq >= skip_lo)
                late++;
            else {
                handover = 1;  /* maybe in an older given-up range */
                break;
            }
            continue;
        }
        int held = PyDict_Contains(buf, seqo);
        if (held < 0)
            goto done;
        if (held) {
            dup++;
            continue;
        }
        if (seq != r.last + 1 && PyDict_GET_SIZE(buf) >= capacity) {
            handover = 1;  /* a flush: the Python path */
            break;
        }
        int past = reorder_take(&r, seqo, seq, item);
        if (past < 0 || append_arrival(acc, seqo, seq, r.last) < 0)
            goto done;
        if (past) {  /* past the deque's limit the caller compacts it */
            i++;
            break;
        }
    }
    if (r.stored && now > tlast)
        tlast = now;
    result = Py_BuildValue("(nOLdKKOi)", i, r.out, r.last, tlast, dup, late, acc, handover);
done:
    reorder_close(&r);
    Py_XDECREF(acc);
    return result;
}

static PyObject *
nack_gaps(PyObject *self, PyObject *args)
{
    PyObject *arrivals;
    struct nack_st s = {NULL, NULL, 0, 0, 0, 0, 0, 0};
    if (!PyArg_ParseTuple(args, "O!LO!LLO!", &PyDict_Type, &s.missing, &s.high, &PyList_Type, &arrivals,
                          &s.send_buffer, &s.track, &PyFloat_Type, &s.nowo))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(arrivals);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *a = PyList_GET_ITEM(arrivals, i);
        if (!PyTuple_Check(a) || PyTuple_GET_SIZE(a) != 2) {
            PyErr_SetString(PyExc_TypeError, "arrivals must hold (seq, delivered up to) tuples");
            return NULL;
        }
        long long seq = PyLong_AsLongLong(PyTuple_GET_ITEM(a, 0));
        long long upto = PyLong_AsLongLong(PyTuple_GET_ITEM(a, 1));
        if ((seq == -1 || upto == -1) && PyErr_Occurred())
            return NULL;
        if (nack_one(&s, seq, upto) < 0)
            return NULL;
    }
    return Py_BuildValue("(LLiL)", s.high, s.top, s.noted, s.untracked);
}

/* receive_new(datagrams, start, member, session, cur_epoch, cur_decrypt, prev_epoch, prev_decrypt,
 *             invalid_tag, buf, arrivals, limit, last, skip_lo, skip_hi, tlast, capacity, now,
 *             missing, rx_high, send_buffer, track)
 *     open_new, ReorderBuffer.push and NackReceiver.on_data for each
 *     datagram in turn, as Session._receive_data does per datagram: a stale
 *     copy (seq <= last, or buffered: also one opened earlier in this batch)
 *     is counted before any decryption (dup, or late within skip_lo..skip_hi);
 *     a new one is opened and released (seq == last + 1, with what follows
 *     it in ``buf``) or buffered (``buf``, ``arrivals``: the reorder buffer's
 *     own dict and deque, as reorder_push takes them), then its number goes
 *     through NACK gap bookkeeping on ``missing`` (nack_gaps's; None: NACKs
 *     off).  Stops before a datagram that needs the full path (not this
 *     member's well-formed sealed DATA, an unknown epoch, a stale copy below
 *     skip_lo, a new number at a full buffer: a flush, a number the 64-bit
 *     signed arithmetic cannot hold) and after one that took ``arrivals``
 *     past ``limit`` (the caller compacts it).  Returns (index, released,
 *     last, tlast, dup, late, rx_bytes, auth_fail, accepted, rx_high, top,
 *     noted, untracked): released the plaintexts in order, accepted how many
 *     were taken; the NACK figures as nack_gaps's (0 with NACKs off).
 */
static PyObject *
receive_new(PyObject *self, PyObject *args)
{
    PyObject *dgrams, *buf, *arrivals, *nowo, *missing;
    Py_ssize_t start, limit, capacity;
    int member;
    unsigned long session;
    long long last;
    unsigned long long skip_lo, skip_hi;
    double tlast;
    struct opener o = {0, 0, NULL, NULL, NULL, 0, 0, 0, 0};
    struct nack_st s = {NULL, NULL, 0, 0, 0, 0, 0, 0};
    if (!PyArg_ParseTuple(args, "O!nikiOiOOO!OnLKKdnO!OLLL", &PyList_Type, &dgrams, &start, &member,
                          &session, &o.cur_epoch, &o.cur_dec, &o.prev_epoch, &o.prev_dec, &o.invalid_tag,
                          &PyDict_Type, &buf, &arrivals, &limit, &last, &skip_lo, &skip_hi, &tlast,
                          &capacity, &PyFloat_Type, &nowo, &missing, &s.high, &s.send_buffer, &s.track))
        return NULL;
    if (missing != Py_None && !PyDict_Check(missing)) {
        PyErr_SetString(PyExc_TypeError, "missing must be a dict or None");
        return NULL;
    }
    if (last < 0) {
        PyErr_SetString(PyExc_ValueError, "last must be >= 0");
        return NULL;
    }
    s.missing = missing;
    s.nowo = nowo;
    Py_ssize_t n = PyList_GET_SIZE(dgrams), i = start;
    unsigned long long accepted = 0;
    struct reorder_st r = {buf, NULL, NULL, NULL, NULL, limit, capacity, last, 0};
    PyObject *result = NULL;
    if (reorder_open(&r, arrivals, tlast, nowo) < 0)
        goto done;
    for (; i < n; i++) {
        const unsigned char *p;
        Py_ssize_t len;
        uint64_t useq;
        if (!data_of(PyList_GET_ITEM(dgrams, i), member, session, &p, &len, &useq))
            break;
        if (useq >= (1ULL << 62))
            break;  /* the full path knows big numbers (and the gap arithmetic stays in range) */
        PyObject *seqo, *pt;
        int st = open_copy(&o, p, len, useq, (unsigned long long)r.last, skip_lo, skip_hi, buf,
                           PyDict_GET_SIZE(buf) >= capacity, &seqo, &pt);
        if (st < 0)
            goto done;
        if (st == 2)
            break;
        if (st == 1)
            continue;
        long long seq = (long long)useq;
        accepted++;
        int past = reorder_take(&r, seqo, seq, pt);
        Py_DECREF(seqo);
        Py_DECREF(pt);
        if (past < 0 || (missing != Py_None && nack_one(&s, seq, r.last) < 0))
            goto done;
        if (past) {
            i++;
            break;
        }
    }
    if (r.stored && PyFloat_AS_DOUBLE(nowo) > tlast)
        tlast = PyFloat_AS_DOUBLE(nowo);
    result = Py_BuildValue("(nOLdKKKKKLLiL)", i, r.out, r.last, tlast, o.dup, o.late, o.rx_bytes,
                           o.auth_fail, accepted, s.high, s.top, s.noted, s.untracked);
done:
    reorder_close(&r);
    return result;
}

static PyObject *
seal_each(PyObject *self, PyObject *args)
{
    PyObject *encrypt, *packets, *decided, *sendbuf;
    unsigned long session;
    int epoch;
    unsigned long long seq0, mask;
    if (!PyArg_ParseTuple(args, "OkiKO!O!O!K", &encrypt, &session, &epoch, &seq0,
                          &PyList_Type, &packets, &PyList_Type, &decided, &PyList_Type, &sendbuf,
                          &mask))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(packets);
    if (PyList_GET_SIZE(decided) != n) {
        PyErr_SetString(PyExc_ValueError, "packets and decided differ in length");
        return NULL;
    }
    if ((unsigned long long)PyList_GET_SIZE(sendbuf) <= mask) {
        PyErr_SetString(PyExc_ValueError, "sendbuf shorter than mask + 1");
        return NULL;
    }
    /* the subflows used, in order of first use (a handful: compared by identity) */
    PyObject *subs[256];
    long mem[256];  /* their members, read once per call */
    Py_ssize_t cnt[256];
    unsigned long long byt[256];
    int nsubs = 0;
    PyObject *items = PyList_New(0), *result = NULL, *per = NULL;
    if (items == NULL)
        return NULL;
    unsigned char hdr[HLEN], nonce[12];
    init_data_header(hdr, nonce, session, epoch);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *targets = PyList_GET_ITEM(decided, i);
        if (!PyList_Check(targets) && !PyTuple_Check(targets)) {
            PyErr_SetString(PyExc_TypeError, "decided must hold lists of subflows");
            goto fail;
        }
        uint64_t seq = seq0 + (uint64_t)i;
        PyObject *sealed = seal_one(encrypt, hdr, nonce, PyList_GET_ITEM(packets, i), seq);
        if (sealed == NULL)
            goto fail;
        Py_ssize_t dlen = PyBytes_GET_SIZE(sealed);
        const char *sp = PyBytes_AS_STRING(sealed);
        for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(targets); j++) {
            PyObject *sub = PySequence_Fast_GET_ITEM(targets, j);
            int k = 0;
            while (k < nsubs && subs[k] != sub)
                k++;
            if (k == nsubs) {  /* a subflow not seen in this call: its member, once */
                if (nsubs == 256) {
                    Py_DECREF(sealed);
                    PyErr_SetString(PyExc_ValueError, "more than 256 subflows");
                    goto fail;
                }
                PyObject *mo = PyObject_GetAttrString(sub, "member");
                long m = mo ? PyLong_AsLong(mo) : -1;
                Py_XDECREF(mo);
                if (mo != NULL && (m < 0 || m > 255)) {
                    if (!PyErr_Occurred())
                        PyErr_SetString(PyExc_ValueError, "member out of range");
                }
                if (PyErr_Occurred()) {
                    Py_DECREF(sealed);
                    goto fail;
                }
                subs[nsubs] = sub; mem[nsubs] = m; cnt[nsubs] = 0; byt[nsubs] = 0;
                nsubs++;
            }
            long m = mem[k];
            PyObject *mo = PyLong_FromLong(m);  /* 0-255: the interpreter's cached ints */
            if (mo == NULL) {
                Py_DECREF(sealed);
                goto fail;
            }
            PyObject *copy = PyBytes_FromStringAndSize(sp, dlen);
            PyObject *item = copy ? PyTuple_Pack(2, mo, copy) : NULL;
            Py_DECREF(mo);
            Py_XDECREF(copy);
            if (item == NULL) {
                Py_DECREF(sealed);
                goto fail;
            }
            PyBytes_AS_STRING(copy)[OFF_MEMBER] = (unsigned char)m;
            int r = PyList_Append(items, item);
            Py_DECREF(item);
            if (r < 0) {
                Py_DECREF(sealed);
                goto fail;
            }
            cnt[k]++;
            byt[k] += (unsigned long long)dlen;
        }
        int kept = keep_for_resend(sendbuf, mask, seq, sealed, targets);
        Py_DECREF(sealed);
        if (kept < 0)
            goto fail;
    }
    /* the subflows are still referenced by decided (borrowed until here) */
    per = PyList_New(nsubs);
    if (per == NULL)
        goto fail;
    for (int k = 0; k < nsubs; k++) {
        PyObject *t = Py_BuildValue("(OnK)", subs[k], cnt[k], byt[k]);
        if (t == NULL)
            goto fail;
        PyList_SET_ITEM(per, k, t);
    }
    result = PyTuple_Pack(2, items, per);
fail:
    Py_XDECREF(per);
    Py_DECREF(items);
    return result;
}

static uint16_t get16(const unsigned char *p);

/* flows.Urgent's bits (tests/test_offer_many.py compares with flows.py) */
#define U_SYN 0x01
#define U_FIN 0x02
#define U_RST 0x04
#define U_ACK 0x08
#define U_DNS 0x10
#define U_ICMP 0x20
#define U_DSCP 0x40
#define U_SMALL 0x80

static PyObject *
flow_result(int v, int proto, const unsigned char *src, const unsigned char *dst, Py_ssize_t alen,
            long sport, long dport, long urgent)
{
    if (v == 0)
        return Py_BuildValue("((iiy#y#ii)l)", 0, 0, "", (Py_ssize_t)0, "", (Py_ssize_t)0, 0, 0, urgent);
    return Py_BuildValue("((iiy#y#ll)l)", v, proto, src, alen, dst, alen, sport, dport, urgent);
}

/* classify's result without Python objects (for the C loops' runs) */
struct fkey {
    int v, proto;
    Py_ssize_t alen;
    long sport, dport, urgent;
    unsigned char src[16], dst[16];
};

static void
fkey_set(struct fkey *k, int v, int proto, const unsigned char *src, const unsigned char *dst,
         Py_ssize_t alen, long sport, long dport, long urgent)
{
    memset(k, 0, sizeof *k);
    k->urgent = urgent;
    if (v == 0)
        return;
    k->v = v;
    k->proto = proto;
    k->alen = alen;
    memcpy(k->src, src, (size_t)alen);
    memcpy(k->dst, dst, (size_t)alen);
    k->sport = sport;
    k->dport = dport;
}

/* the same flow key (classify's key tuples equal) */
static int
fkey_eq(const struct fkey *a, const struct fkey *b)
{
    return a->v == b->v && a->proto == b->proto && a->alen == b->alen && a->sport == b->sport
           && a->dport == b->dport && memcmp(a->src, b->src, (size_t)a->alen) == 0
           && memcmp(a->dst, b->dst, (size_t)a->alen) == 0;
}

/* classify's key tuple (v, proto, src, dst, sport, dport) as an fkey; -1 (TypeError) if it is not one */
static int
fkey_from(PyObject *key, struct fkey *k)
{
    memset(k, 0, sizeof *k);
    if (!PyTuple_Check(key) || PyTuple_GET_SIZE(key) != 6 || !PyBytes_Check(PyTuple_GET_ITEM(key, 2))
            || !PyBytes_Check(PyTuple_GET_ITEM(key, 3))
            || PyBytes_GET_SIZE(PyTuple_GET_ITEM(key, 2)) > 16
            || PyBytes_GET_SIZE(PyTuple_GET_ITEM(key, 3)) != PyBytes_GET_SIZE(PyTuple_GET_ITEM(key, 2))) {
        PyErr_SetString(PyExc_TypeError, "key must be classify's flow key");
        return -1;
    }
    k->v = (int)PyLong_AsLong(PyTuple_GET_ITEM(key, 0));
    k->proto = (int)PyLong_AsLong(PyTuple_GET_ITEM(key, 1));
    k->sport = PyLong_AsLong(PyTuple_GET_ITEM(key, 4));
    k->dport = PyLong_AsLong(PyTuple_GET_ITEM(key, 5));
    if (PyErr_Occurred())
        return -1;
    k->alen = PyBytes_GET_SIZE(PyTuple_GET_ITEM(key, 2));
    memcpy(k->src, PyBytes_AS_STRING(PyTuple_GET_ITEM(key, 2)), (size_t)k->alen);
    memcpy(k->dst, PyBytes_AS_STRING(PyTuple_GET_ITEM(key, 3)), (size_t)k->alen);
    return 0;
}

static void
classify_raw(const unsigned char *p, Py_ssize_t n, Py_ssize_t small, struct fkey *k)
{
    Py_ssize_t off, end;
    long urgent = 0;
    int v, proto, dscp, fragmented;
    const unsigned char *src, *dst;
    Py_ssize_t alen;
    if (n < 1) {
        fkey_set(k, 0, 0, NULL, NULL, 0, 0, 0, 0);
        return;
    }
    if (n <= small)
        urgent = U_SMALL;
    if (n >= 20 && p[0] >> 4 == 4) {
        Py_ssize_t ihl = (p[0] & 0x0F) * 4, length = get16(p + 2);
        if (ihl < 20 || n < ihl) {
            fkey_set(k, 0, 0, NULL, NULL, 0, 0, 0, urgent);
            return;
        }
        v = 4;
        dscp = p[1] >> 2;
        proto = p[9];
        src = p + 12; dst = p + 16; alen = 4;
        off = ihl;
        end = (0 < length && length < n) ? length : n;
        fragmented = (get16(p + 6) & 0x3FFF) != 0;
    } else {
        v = p[0] >> 4;
        if (v != 6 || n < 40) {
            fkey_set(k, 0, 0, NULL, NULL, 0, 0, 0, urgent);
            return;
        }
        dscp = ((p[0] & 0x0F) << 2) | (p[1] >> 6);
        proto = p[6];
        src = p + 8; dst = p + 24; alen = 16;
        off = 40;
        Py_ssize_t plen = get16(p + 4);
        end = plen ? (n < 40 + plen ? n : 40 + plen) : n;
        fragmented = 0;
        for (int k = 0; k < 8; k++) {
            if (proto == 0 || proto == 43 || proto == 60) {
                if (off + 2 > end)
                    break;
                Py_ssize_t next = off + (p[off + 1] + 1) * 8;
                proto = p[off]; off = next;
            } else if (proto == 51) {
                if (off + 2 > end)
                    break;
                Py_ssize_t next = off + (p[off + 1] + 2) * 4;
                proto = p[off]; off = next;
            } else if (proto == 44) {
                if (off + 8 > end)
                    break;
                fragmented = 1;
                proto = p[off]; off += 8;
            } else {
                break;
            }
        }
    }
    if (dscp == 46 || dscp == 48 || dscp == 56)
        urgent |= U_DSCP;
    if (proto == 6) {
        if (fragmented || off + 4 > end) {
            fkey_set(k, v, proto, src, dst, alen, 0, 0, urgent);
            return;
        }
        long sport = get16(p + off), dport = get16(p + off + 2);
        if (sport == 53 || dport == 53)
            urgent |= U_DNS;
        if (off + 14 <= end) {
            int doff = p[off + 12], flags = p[off + 13];
            if (flags & 0x07) {
                if (flags & 0x02) urgent |= U_SYN;
                if (flags & 0x01) urgent |= U_FIN;
                if (flags & 0x04) urgent |= U_RST;
            } else if (flags & 0x10) {
                doff = (doff >> 4) * 4;
                if (doff >= 20 && off + doff >= end)
                    urgent |= U_ACK;
            }
        }
        fkey_set(k, v, proto, src, dst, alen, sport, dport, urgent);
        return;
    }
    if (proto == 1 || proto == 58) {
        fkey_set(k, v, proto, src, dst, alen, 0, 0, urgent | U_ICMP);
        return;
    }
    if (fragmented || proto != 17 || off + 4 > end) {
        fkey_set(k, v, proto, src, dst, alen, 0, 0, urgent);
        return;
    }
    {
        long sport = get16(p + off), dport = get16(p + off + 2);
        if (sport == 53 || dport == 53)
            urgent |= U_DNS;
        fkey_set(k, v, proto, src, dst, alen, sport, dport, urgent);
    }
}

static PyObject *
classify(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"packet", "small", NULL};
    Py_buffer buf;
    Py_ssize_t small = 128;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*|n", kwlist, &buf, &small))
        return NULL;
    struct fkey k;
    classify_raw(buf.buf, buf.len, small, &k);
    PyBuffer_Release(&buf);
    return flow_result(k.v, k.proto, k.src, k.dst, k.alen, k.sport, k.dport, k.urgent);
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
        if (len < HLEN + TAG || p[OFF_VERSION] != VERSION || p[OFF_OPCODE] != OP_DATA
                || p[OFF_MEMBER] != member || p[OFF_FLAGS] != F_SEALED || p[OFF_RESERVED] != 0)
            break;
        const unsigned char *ps = p + OFF_SESSION;
        uint32_t sid = ((uint32_t)ps[0] << 24) | ((uint32_t)ps[1] << 16) | ((uint32_t)ps[2] << 8) | ps[3];
        Py_ssize_t plen = ((Py_ssize_t)p[OFF_LENGTH] << 8) | p[OFF_LENGTH + 1];
        if (sid != session || len != HLEN + plen + TAG)
            break;
        uint64_t seq = get_be64(p + OFF_SEQ);
        if (seq <= last) {  /* a later copy: no decryption */
            if (!count_old_copy(seq, skip_lo, skip_hi, &dup, &late))
                break;  /* maybe in an older given-up range */
            rx_bytes += len;
            continue;
        }
        if (seq != last + 1)
            break;  /* out of order: the reorder buffer's job */
        PyObject *dec;
        if (p[OFF_EPOCH] == cur_epoch)
            dec = cur_dec;
        else if (prev_epoch >= 0 && p[OFF_EPOCH] == prev_epoch && prev_dec != Py_None)
            dec = prev_dec;
        else
            break;  /* unknown epoch: counted by the full path */
        memcpy(nonce + 4, p + OFF_SEQ, 8);
        memcpy(aad, p, HLEN);
        aad[OFF_MEMBER] = 0;
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


/* ---------------------------------------------------------------------------
 * tun offloads (mpvpn.offload has the reference Python and the rules):
 *
 * split(frame) -> [packet, ...]: one read from a vnet-hdr tun (10-byte
 *     virtio_net_hdr + packet, possibly a TCP or UDP super-segment) as plain
 *     packets with complete checksums.  ValueError if it cannot be split.
 * coalesce(packets) -> [frame, ...]: tun writes (vnet header + packet) for
 *     packets in delivery order, consecutive in-order TCP segments of a flow
 *     merged into one super-segment with NEEDS_CSUM (the kernel completes
 *     the checksum).  Byte for byte what offload.coalesce() writes.
 * ------------------------------------------------------------------------- */

#define VNET 10
#define F_NEEDS_CSUM 1
#define GSO_NONE 0
#define GSO_TCPV4 1
#define GSO_TCPV6 4
#define GSO_UDP_L4 5
#define GSO_ECN 0x80
#define MAX_SUPER 65535

static uint32_t ones_sum(const unsigned char *p, Py_ssize_t n) {
    uint64_t acc = 0;
    Py_ssize_t i = 0;
    for (; i + 1 < n; i += 2)
        acc += ((uint32_t)p[i] << 8) | p[i + 1];
    if (i < n)
        acc += (uint32_t)p[i] << 8;
    return (uint32_t)(acc % 0xFFFF);
}

static uint16_t csum_field(uint32_t sum) {  /* offload.checksum(): 0xFFFF - sum % 0xFFFF */
    return (uint16_t)(0xFFFF - sum % 0xFFFF);
}

static uint16_t get16(const unsigned char *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static uint32_t get32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static void put16(unsigned char *p, uint32_t v) { p[0] = (v >> 8) & 0xff; p[1] = v & 0xff; }

static PyObject *offload_error(const char *why) {
    PyErr_SetString(PyExc_ValueError, why);
    return NULL;
}

static Py_ssize_t l4_offset(const unsigned char *pkt, Py_ssize_t n, int cstart, int proto) {
    if (n < 20)
        return -1;
    int v = pkt[0] >> 4;
    if (v == 4) {
        int ihl = (pkt[0] & 15) * 4;
        if (ihl < 20 || pkt[9] != proto || cstart != ihl)
            return -1;
        return ihl;
    }
    if (v == 6) {
        if (cstart < 40 || (cstart == 40 && pkt[6] != proto))
            return -1;
        return cstart;
    }
    return -1;
}

/* segments of a TCP (tcp=1) or UDP super-segment */
static PyObject *gso_split(const unsigned char *pkt, Py_ssize_t total, int gso_size, int cstart, int tcp) {
    Py_ssize_t t = l4_offset(pkt, total, cstart, tcp ? 6 : 17);
    if (t < 0)
        return offload_error("not a plain IP segment of the expected protocol");
    Py_ssize_t hlen;
    if (tcp) {
        if (t + 20 > total)
            return offload_error("truncated TCP header");
        hlen = t + (pkt[t + 12] >> 4) * 4;
        if (hlen > total || hlen < t + 20 || gso_size == 0)
            return offload_error("bad TCP header length or gso_size");
    } else {
        hlen = t + 8;
        if (hlen > total || gso_size == 0)
            return offload_error("bad UDP header or gso_size");
    }
    int v4 = pkt[0] >> 4 == 4;
    unsigned char *head = PyMem_Malloc(hlen);
    if (head == NULL)
        return PyErr_NoMemory();
    memcpy(head, pkt, hlen);
    uint32_t seq0 = tcp ? get32(head + t + 4) : 0;
    unsigned char flags0 = tcp ? head[t + 13] : 0;
    uint16_t ident0 = 0;
    if (tcp) { head[t + 16] = head[t + 17] = 0; } else { head[t + 6] = head[t + 7] = 0; }
    uint32_t addr_sum;
    if (v4) {
        ident0 = get16(head + 4);
        head[10] = head[11] = 0;
        addr_sum = ones_sum(head + 12, 8);
    } else {
        addr_sum = ones_sum(head + 8, 32);
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        PyMem_Free(head);
        return NULL;
    }
    Py_ssize_t pos = hlen;
    uint32_t i = 0;
    while (pos < total) {
        Py_ssize_t end = pos + gso_size < total ? pos + gso_size : total;
        Py_ssize_t n = end - pos;
        int last = end == total;
        PyObject *seg = PyBytes_FromStringAndSize(NULL, hlen + n);
        if (seg == NULL) {
            Py_DECREF(out);
            PyMem_Free(head);
            return NULL;
        }
        unsigned char *h = (unsigned char *)PyBytes_AS_STRING(seg);
        memcpy(h, head, hlen);
        memcpy(h + hlen, pkt + pos, n);
        uint32_t l4;
        if (tcp) {
            uint32_t sq = seq0 + (uint32_t)(pos - hlen);
            h[t + 4] = sq >> 24; h[t + 5] = sq >> 16; h[t + 6] = sq >> 8; h[t + 7] = sq;
            unsigned char fl = flags0;
            if (!last)
                fl &= ~(0x01 | 0x08);  /* FIN, PSH */
            if (i)
                fl &= ~0x80;  /* CWR */
            h[t + 13] = fl;
            l4 = (uint32_t)(hlen - t + n);
        } else {
            put16(h + t + 4, (uint32_t)(8 + n));
            l4 = (uint32_t)(8 + n);
        }
        if (v4) {
            put16(h + 2, (uint32_t)(hlen + n));
            put16(h + 4, (uint32_t)((ident0 + i) & 0xFFFF));
            uint16_t c = csum_field(ones_sum(h, t));
            h[10] = c >> 8; h[11] = c & 0xff;
        } else {
            put16(h + 4, (uint32_t)(hlen - 40 + n));
        }
        uint32_t init = tcp ? addr_sum + 6 + (l4 >> 16) + (l4 & 0xFFFF) : addr_sum + 17 + l4;
        uint16_t c = csum_field(ones_sum(h + t, hlen - t + n) + init % 0xFFFF);
        Py_ssize_t at = tcp ? t + 16 : t + 6;
        h[at] = c >> 8; h[at + 1] = c & 0xff;
        if (PyList_Append(out, seg) < 0) {
            Py_DECREF(seg);
            Py_DECREF(out);
            PyMem_Free(head);
            return NULL;
        }
        Py_DECREF(seg);
        pos = end;
        i++;
    }
    PyMem_Free(head);
    return out;
}

static PyObject *
split(PyObject *self, PyObject *arg)
{
    if (!PyBytes_Check(arg))
        return offload_error("frame must be bytes");
    Py_ssize_t n = PyBytes_GET_SIZE(arg);
    const unsigned char *f = (const unsigned char *)PyBytes_AS_STRING(arg);
    if (n < VNET)
        return offload_error("frame shorter than a virtio_net_hdr");
    uint16_t hv[4];
    memcpy(hv, f + 2, 8);  /* host byte order: hdr_len, gso_size, csum_start, csum_offset */
    int flags = f[0], gso = f[1] & ~GSO_ECN;
    const unsigned char *pkt = f + VNET;
    Py_ssize_t plen = n - VNET;
    if (gso == GSO_NONE) {
        PyObject *p = PyBytes_FromStringAndSize((const char *)pkt, plen);
        if (p == NULL)
            return NULL;
        if (flags & F_NEEDS_CSUM) {
            Py_ssize_t start = hv[2], at = (Py_ssize_t)hv[2] + hv[3];
            if (at + 2 > plen) {
                Py_DECREF(p);
                return offload_error("checksum offsets outside the packet");
            }
            unsigned char *q = (unsigned char *)PyBytes_AS_STRING(p);
            uint16_t c = csum_field(ones_sum(q + start, plen - start));
            q[at] = c >> 8; q[at + 1] = c & 0xff;
        }
        PyObject *out = PyList_New(1);
        if (out == NULL) {
            Py_DECREF(p);
            return NULL;
        }
        PyList_SET_ITEM(out, 0, p);
        return out;
    }
    if (gso == GSO_TCPV4 || gso == GSO_TCPV6)
        return gso_split(pkt, plen, hv[1], hv[2], 1);
    if (gso == GSO_UDP_L4)
        return gso_split(pkt, plen, hv[1], hv[2], 0);
    return offload_error("unsupported gso_type");
}

typedef struct {
    PyObject *first, *last;
    Py_ssize_t start, count;  /* packets[start..] that joined, via idx list */
    int t, hlen, gso, closed, limit;
    Py_ssize_t size;
    uint32_t next_seq;
    uint16_t next_id;
    Py_ssize_t *members;  /* indices of the packets in this group */
    Py_ssize_t nmem, cap;
    int single;  /* not a TCP candidate: written as it came */
} group_t;

static int tcp_candidate(const unsigned char *p, Py_ssize_t n, int *t_out, int *hlen_out) {
    if (n < 40)
        return 0;
    int t;
    if (p[0] == 0x45) {
        if (p[9] != 6 || (p[6] & 0xBF) || p[7])
            return 0;
        t = 20;
    } else if (p[0] >> 4 == 6) {
        if (p[6] != 6 || n < 60)
            return 0;
        t = 40;
    } else {
        return 0;
    }
    int fl = p[t + 13];
    if (fl != 0x10 && fl != (0x10 | 0x08))
        return 0;
    int hlen = t + (p[t + 12] >> 4) * 4;
    if (hlen >= n || hlen < t + 20)
        return 0;
    *t_out = t;
    *hlen_out = hlen;
    return 1;
}

static int same_fields(const unsigned char *a, const unsigned char *b, int t, int hlen) {
    if (t == 20)
        return !memcmp(a, b, 2) && !memcmp(a + 6, b + 6, 4) && !memcmp(a + 12, b + 12, 12)
            && !memcmp(a + 28, b + 28, 5) && !memcmp(a + 34, b + 34, 2) && !memcmp(a + 38, b + 38, hlen - 38);
    return !memcmp(a, b, 4) && !memcmp(a + 6, b + 6, 38) && !memcmp(a + 48, b + 48, 5)
        && !memcmp(a + 54, b + 54, 2) && !memcmp(a + 58, b + 58, hlen - 58);
}

static int group_push(group_t *g, Py_ssize_t idx) {
    if (g->nmem == g->cap) {
        Py_ssize_t cap = g->cap ? g->cap * 2 : 8;
        Py_ssize_t *m = PyMem_Realloc(g->members, cap * sizeof(Py_ssize_t));
        if (m == NULL)
            return -1;
        g->members = m;
        g->cap = cap;
    }
    g->members[g->nmem++] = idx;
    return 0;
}

static int group_add(group_t *g, PyObject *po) {
    if (g->single || g->closed)
        return 0;
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(po);
    Py_ssize_t len = PyBytes_GET_SIZE(po);
    const unsigned char *f = (const unsigned char *)PyBytes_AS_STRING(g->first);
    int hlen = g->hlen, t = g->t;
    Py_ssize_t n = len - hlen;
    if (n <= 0 || n > g->gso || g->size + n > g->limit)
        return 0;
    if (len < hlen || !same_fields(p, f, t, hlen))
        return 0;
    if (t == 20) {
        if (get32(p + 24) != g->next_seq || get16(p + 4) != g->next_id)
            return 0;
        g->next_id = (uint16_t)(g->next_id + 1);
    } else if (get32(p + 44) != g->next_seq) {
        return 0;
    }
    g->size += n;
    g->next_seq += (uint32_t)n;
    g->last = po;
    if (n < g->gso || (p[t + 13] & 0x08))
        g->closed = 1;
    return 1;
}

static PyObject *group_frame(group_t *g, PyObject *packets) {
    if (g->single || g->nmem == 1) {
        Py_ssize_t n = PyBytes_GET_SIZE(g->first);
        PyObject *fr = PyBytes_FromStringAndSize(NULL, VNET + n);
        if (fr == NULL)
            return NULL;
        char *q = PyBytes_AS_STRING(fr);
        memset(q, 0, VNET);
        memcpy(q + VNET, PyBytes_AS_STRING(g->first), n);
        return fr;
    }
    int t = g->t, hlen = g->hlen;
    Py_ssize_t total = g->size;
    PyObject *fr = PyBytes_FromStringAndSize(NULL, VNET + total);
    if (fr == NULL)
        return NULL;
    unsigned char *q = (unsigned char *)PyBytes_AS_STRING(fr);
    unsigned char *h = q + VNET;
    memcpy(h, PyBytes_AS_STRING(g->first), PyBytes_GET_SIZE(g->first));
    uint32_t l4 = (uint32_t)(total - t), ps;
    unsigned char gso_type;
    if (t == 20) {
        put16(h + 2, (uint32_t)total);
        h[10] = h[11] = 0;
        uint16_t c = csum_field(ones_sum(h, 20));
        h[10] = c >> 8; h[11] = c & 0xff;
        gso_type = GSO_TCPV4;
        ps = (ones_sum(h + 12, 8) + 6 + l4) % 0xFFFF;
    } else {
        put16(h + 4, (uint32_t)(total - 40));
        gso_type = GSO_TCPV6;
        ps = (ones_sum(h + 8, 32) + 6 + (l4 >> 16) + (l4 & 0xFFFF)) % 0xFFFF;
    }
    h[t + 13] = ((const unsigned char *)PyBytes_AS_STRING(g->last))[t + 13];
    h[t + 16] = ps >> 8; h[t + 17] = ps & 0xff;
    Py_ssize_t off = PyBytes_GET_SIZE(g->first);
    for (Py_ssize_t k = 1; k < g->nmem; k++) {
        PyObject *p = PyList_GET_ITEM(packets, g->members[k]);
        Py_ssize_t n = PyBytes_GET_SIZE(p) - hlen;
        memcpy(h + off, PyBytes_AS_STRING(p) + hlen, n);
        off += n;
    }
    q[0] = F_NEEDS_CSUM;
    q[1] = gso_type;
    uint16_t hv[4] = {(uint16_t)hlen, (uint16_t)g->gso, (uint16_t)t, 16};
    memcpy(q + 2, hv, 8);
    return fr;
}

static PyObject *
coalesce(PyObject *self, PyObject *arg)
{
    if (!PyList_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "packets must be a list");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(arg);
    for (Py_ssize_t i = 0; i < n; i++)
        if (!PyBytes_Check(PyList_GET_ITEM(arg, i))) {
            PyErr_SetString(PyExc_TypeError, "packets must be bytes");
            return NULL;
        }
    group_t *gs = PyMem_Calloc(n ? n : 1, sizeof(group_t));
    if (gs == NULL)
        return PyErr_NoMemory();
    Py_ssize_t ng = 0, prev = -1;
    PyObject *out = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *po = PyList_GET_ITEM(arg, i);
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(po);
        Py_ssize_t len = PyBytes_GET_SIZE(po);
        int t, hlen;
        if (!tcp_candidate(p, len, &t, &hlen)) {
            group_t *g = &gs[ng++];
            g->first = g->last = po;
            g->single = 1;
            continue;
        }
        if (prev >= 0 && group_add(&gs[prev], po)) {
            if (group_push(&gs[prev], i) < 0)
                goto fail;
            continue;
        }
        /* the newest group of this flow (addresses and ports) */
        Py_ssize_t found = -1;
        for (Py_ssize_t k = ng - 1; k >= 0; k--) {
            group_t *g = &gs[k];
            if (g->single || g->t != t)
                continue;
            const unsigned char *f = (const unsigned char *)PyBytes_AS_STRING(g->first);
            if (t == 20 ? !memcmp(f + 12, p + 12, 12) : !memcmp(f + 8, p + 8, 36)) {
                found = k;
                break;
            }
        }
        if (found >= 0 && group_add(&gs[found], po)) {
            if (group_push(&gs[found], i) < 0)
                goto fail;
            prev = found;
            continue;
        }
        group_t *g = &gs[ng];
        g->first = g->last = po;
        g->t = t;
        g->hlen = hlen;
        g->gso = (int)(len - hlen);
        g->size = len;
        g->limit = MAX_SUPER + (t == 40) * 40;
        g->next_seq = get32(p + t + 4) + (uint32_t)g->gso;
        g->next_id = t == 20 ? (uint16_t)(get16(p + 4) + 1) : 0;
        g->closed = (p[t + 13] & 0x08) != 0;
        if (group_push(g, i) < 0)
            goto fail;
        prev = ng++;
    }
    out = PyList_New(ng);
    if (out == NULL)
        goto fail;
    for (Py_ssize_t k = 0; k < ng; k++) {
        PyObject *fr = group_frame(&gs[k], arg);
        if (fr == NULL) {
            Py_CLEAR(out);
            goto fail;
        }
        PyList_SET_ITEM(out, k, fr);
    }
fail:
    for (Py_ssize_t k = 0; k < ng; k++)
        PyMem_Free(gs[k].members);
    if (ng < n)  /* a group being filled when an allocation failed */
        PyMem_Free(gs[ng].members);
    PyMem_Free(gs);
    return out;
}

/* -- the scheduler's spread decision (mpvpn.core.scheduler.Scheduler.offer_many) --
 *
 * spread_run(packets, start, key, small, urgent_on, ones, meters, now, owd, ldiv, target, overhead)
 *     Stage 2's spread case of Scheduler.offer_many for packets[start:] while
 *     they belong to the flow ``key`` (classify's key; an urgent packet, when
 *     ``urgent_on``, stops the run) and a subflow has room: each goes on the
 *     subflow where it arrives first, eta = owd + (q + len) / rate (divided by
 *     ldiv when not 0), among those whose modelled backlog q / rate is below
 *     ``target``; the chosen one's q grows by len + overhead (what
 *     LinkMeter.on_send adds).  One entry per view: ``ones`` a [subflow]
 *     list (what decided holds for a packet on it: shared, as duplicate mode
 *     shares ``up``), ``meters`` its LinkMeter (read: rate, and q at ``now``
 *     as offer_many computes it), ``owd``, ``ldiv`` floats.  Stops before a
 *     packet of another flow, an urgent one, or one with no subflow with
 *     room (the caller's Python path; with more than 64 subflows it takes
 *     nothing).  Returns (index, decided, sizes, nbytes): decided[k] the
 *     [subflow] list per packet taken, sizes[j] the datagram sizes sent on
 *     view j in order (for LinkMeter.on_send_seq), nbytes the user bytes taken.
 */
#define MAXV 64

static PyObject *s_q, *s_t, *s_bw, *s_bw0;  /* LinkMeter's attribute names, interned at import */

/* What the runs need of each view's LinkMeter at ``now``, read (never
 * written) from the meter: its rate (``bw`` once measured, else ``bw0``:
 * LinkMeter.rate) and its backlog before flooring, q - rate * (now - t), the
 * expression offer_many uses.  0, or -1 with an exception set. */
static int
meter_views(PyObject *meters, Py_ssize_t nv, double now, double *q, double *rate)
{
    if (!PyList_Check(meters) || PyList_GET_SIZE(meters) != nv) {
        PyErr_SetString(PyExc_ValueError, "one meter per subflow");
        return -1;
    }
    for (Py_ssize_t k = 0; k < nv; k++) {
        PyObject *m = PyList_GET_ITEM(meters, k);
        PyObject *bw = PyObject_GetAttr(m, s_bw);
        if (bw == Py_None) {
            Py_DECREF(bw);
            bw = PyObject_GetAttr(m, s_bw0);
        }
        PyObject *mq = bw ? PyObject_GetAttr(m, s_q) : NULL;
        PyObject *mt = mq ? PyObject_GetAttr(m, s_t) : NULL;
        if (mt != NULL) {
            double r = PyFloat_AsDouble(bw), vq = PyFloat_AsDouble(mq), vt = PyFloat_AsDouble(mt);
            rate[k] = r;
            q[k] = vq - r * (now - vt);
        }
        Py_XDECREF(bw);
        Py_XDECREF(mq);
        Py_XDECREF(mt);
        if (mt == NULL || PyErr_Occurred())
            return -1;
        if (!(rate[k] > 0.0)) {
            PyErr_SetString(PyExc_ValueError, "rates must be > 0");
            return -1;
        }
    }
    return 0;
}

/* The float list ``l`` (nv long) into a[] */
static int
floats_of(PyObject *l, Py_ssize_t nv, double *a, const char *what)
{
    if (!PyList_Check(l) || PyList_GET_SIZE(l) != nv) {
        PyErr_Format(PyExc_ValueError, "one %s per subflow", what);
        return -1;
    }
    for (Py_ssize_t k = 0; k < nv; k++) {
        a[k] = PyFloat_AsDouble(PyList_GET_ITEM(l, k));
        if (a[k] == -1.0 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

/* [[], [], ...]: nv new lists (the runs' datagram sizes per view) */
static PyObject *
empty_lists(Py_ssize_t nv)
{
    PyObject *out = PyList_New(nv);
    for (Py_ssize_t k = 0; out != NULL && k < nv; k++) {
        PyObject *l = PyList_New(0);
        if (l == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, k, l);
    }
    return out;
}

static PyObject *
spread_run(PyObject *self, PyObject *args)
{
    PyObject *packets, *key, *ones, *meters, *owdl, *ldivl;
    Py_ssize_t start, small, overhead;
    int urgent_on;
    double target, now;
    if (!PyArg_ParseTuple(args, "O!nOnpO!OdOOdn", &PyList_Type, &packets, &start, &key, &small,
                          &urgent_on, &PyList_Type, &ones, &meters, &now, &owdl, &ldivl, &target,
                          &overhead))
        return NULL;
    Py_ssize_t nv = PyList_GET_SIZE(ones);
    if (nv > MAXV)  /* more subflows than this loop keeps: nothing taken, the Python path decides */
        return Py_BuildValue("(n[][]K)", start, 0ULL);
    struct fkey k0;
    if (fkey_from(key, &k0) < 0)
        return NULL;
    double q[MAXV], rate[MAXV], owd[MAXV], ldiv[MAXV];
    if (meter_views(meters, nv, now, q, rate) < 0 || floats_of(owdl, nv, owd, "owd") < 0
            || floats_of(ldivl, nv, ldiv, "ldiv") < 0)
        return NULL;
    for (Py_ssize_t k = 0; k < nv; k++) {
        PyObject *one = PyList_GET_ITEM(ones, k);
        if (!PyList_Check(one) || PyList_GET_SIZE(one) != 1) {
            PyErr_SetString(PyExc_ValueError, "ones must hold [subflow] lists");
            return NULL;
        }
    }
    Py_ssize_t n = PyList_GET_SIZE(packets), i = start;
    unsigned long long nbytes = 0;
    PyObject *decided = PyList_New(0), *sizes = empty_lists(nv), *result = NULL;
    if (decided == NULL || sizes == NULL)
        goto done;
    for (; i < n; i++) {
        PyObject *p = PyList_GET_ITEM(packets, i);
        if (!PyBytes_Check(p))
            break;  /* the Python path says what it makes of it */
        struct fkey pk;
        classify_raw((const unsigned char *)PyBytes_AS_STRING(p), PyBytes_GET_SIZE(p), small, &pk);
        if (!fkey_eq(&pk, &k0) || (pk.urgent && urgent_on))
            break;
        Py_ssize_t len = PyBytes_GET_SIZE(p);
        int best = -1;
        double best_t = 0.0;
        for (Py_ssize_t k = 0; k < nv; k++) {  /* Scheduler._choose's spread case */
            double qk = q[k] > 0.0 ? q[k] : 0.0;
            if (qk / rate[k] >= target)
                continue;
            double t = owd[k] + (qk + (double)len) / rate[k];
            if (ldiv[k] != 0.0)
                t /= ldiv[k];
            if (best < 0 || t < best_t) {
                best = (int)k;
                best_t = t;
            }
        }
        if (best < 0)
            break;  /* no room: the Python path holds and queues it */
        Py_ssize_t dlen = len + overhead;
        q[best] = (q[best] > 0.0 ? q[best] : 0.0) + (double)dlen;
        /* [subflow]: the caller's list for it, shared by the packets it
         * carries (as duplicate mode's share ``up``: read, never changed) */
        int r = PyList_Append(decided, PyList_GET_ITEM(ones, best));
        if (r < 0)
            goto done;
        PyObject *d = PyLong_FromSsize_t(dlen);
        if (d == NULL)
            goto done;
        r = PyList_Append(PyList_GET_ITEM(sizes, best), d);
        Py_DECREF(d);
        if (r < 0)
            goto done;
        nbytes += (unsigned long long)len;
    }
    result = Py_BuildValue("(nOOK)", i, decided, sizes, nbytes);
done:
    Py_XDECREF(decided);
    Py_XDECREF(sizes);
    return result;
}

/* urgent_run(packets, start, key, small, subs, meters, now, owd, ldiv, loss, F, floor, beta, tokens, overhead)
 *     Stage 3 of Scheduler.offer_many for packets[start:] while they are
 *     urgent (classify's bits not 0) and belong to the flow ``key``, and the
 *     urgent budget (``tokens``, refilled by the caller for ``now``: within
 *     one ``now`` nothing refills it) holds each: Scheduler._objective_set
 *     with ``F``, ``floor`` (loss_floor) and ``beta`` (copy_cost): the
 *     subflow where the packet arrives first (eta as spread_run's, the first
 *     of the earliest), then, while F * prod(L) * (1 - L_j) - beta > 0, the
 *     candidate with the least floored loss (earliest eta breaking ties, the
 *     first of equals).  Each chosen subflow's q grows by len + overhead
 *     (LinkMeter.on_send).  ``meters``, ``owd``, ``ldiv``: as spread_run's;
 *     ``loss``: one float per view (None as 0).  Stops
 *     before a packet of another flow, a non-urgent one, or one the budget
 *     does not hold (the caller's Python path; more than 64 subflows: nothing
 *     taken).  Returns (index, decided, sizes, nbytes, copies, tokens, urgs):
 *     decided[k] the subflows per packet taken, sizes[j] the datagram sizes
 *     sent on view j in order, nbytes the user bytes taken, copies the
 *     copies beyond the first, tokens what the budget has left, urgs {urgent
 *     bits: packets} in first-seen order.
 */
static PyObject *
urgent_run(PyObject *self, PyObject *args)
{
    PyObject *packets, *key, *subs, *meters, *owdl, *ldivl, *lossl;
    Py_ssize_t start, small, overhead;
    double F, floor_, beta, tokens, now;
    if (!PyArg_ParseTuple(args, "O!nOnO!OdOOOddddn", &PyList_Type, &packets, &start, &key, &small,
                          &PyList_Type, &subs, &meters, &now, &owdl, &ldivl, &lossl,
                          &F, &floor_, &beta, &tokens, &overhead))
        return NULL;
    Py_ssize_t nv = PyList_GET_SIZE(subs);
    if (nv == 0 || nv > MAXV)  /* the Python path decides */
        return Py_BuildValue("(n[][]Knd{})", start, 0ULL, (Py_ssize_t)0, tokens);
    struct fkey k0;
    if (fkey_from(key, &k0) < 0)
        return NULL;
    double q[MAXV], rate[MAXV], owd[MAXV], ldiv[MAXV], loss[MAXV], eta[MAXV];
    int cand[MAXV], chosen[MAXV];
    if (meter_views(meters, nv, now, q, rate) < 0 || floats_of(owdl, nv, owd, "owd") < 0
            || floats_of(ldivl, nv, ldiv, "ldiv") < 0 || floats_of(lossl, nv, loss, "loss") < 0)
        return NULL;
    for (Py_ssize_t k = 0; k < nv; k++)
        loss[k] = loss[k] > floor_ ? loss[k] : floor_;  /* _objective_set's floored loss */
    Py_ssize_t n = PyList_GET_SIZE(packets), i = start, copies = 0;
    unsigned long long nbytes = 0;
    PyObject *decided = PyList_New(0), *sizes = empty_lists(nv), *urgs = PyDict_New(), *result = NULL;
    /* packets per urgent bit set (flows.Urgent: 8 bits), in first-seen order */
    Py_ssize_t ucount[256] = {0};
    unsigned char useen[256];
    int nseen = 0;
    /* the chosen lists of one or two subflows, shared by the packets that
     * take the same ones in the same order (read, never changed) */
#define SHARED 8
    PyObject *shared[SHARED][SHARED + 1] = {{NULL}};
    if (decided == NULL || sizes == NULL || urgs == NULL)
        goto done;
    for (; i < n; i++) {
        PyObject *p = PyList_GET_ITEM(packets, i);
        if (!PyBytes_Check(p))
            break;
        struct fkey pk;
        Py_ssize_t len = PyBytes_GET_SIZE(p);
        classify_raw((const unsigned char *)PyBytes_AS_STRING(p), len, small, &pk);
        if (!fkey_eq(&pk, &k0) || !pk.urgent || !(tokens >= (double)len))
            break;
        tokens -= (double)len;  /* Scheduler._urgent_ok */
        int first = -1;
        double best_t = 0.0;
        for (Py_ssize_t k = 0; k < nv; k++) {
            double qk = q[k] > 0.0 ? q[k] : 0.0;
            double t = owd[k] + (qk + (double)len) / rate[k];
            if (ldiv[k] != 0.0)
                t /= ldiv[k];
            eta[k] = t;
            if (first < 0 || t < best_t) {
                first = (int)k;
                best_t = t;
            }
        }
        int nc = 0, nr = 0;
        chosen[nc++] = first;
        double pr = loss[first];
        if (F > 0.0) {
            for (Py_ssize_t k = 0; k < nv; k++)
                if (k != first)
                    cand[nr++] = (int)k;
            while (nr > 0) {
                int j = 0;
                double bl = loss[cand[0]], be = eta[cand[0]];
                for (int r = 1; r < nr; r++) {
                    double li = loss[cand[r]], ei = eta[cand[r]];
                    if (li < bl || (li == bl && ei < be)) {
                        j = r;
                        bl = li;
                        be = ei;
                    }
                }
                if (F * pr * (1.0 - bl) - beta <= 0.0)
                    break;
                chosen[nc++] = cand[j];
                for (int r = j; r < nr - 1; r++)  /* rest.pop(j): the order kept */
                    cand[r] = cand[r + 1];
                nr--;
                pr *= bl;
            }
        }
        PyObject **slot = NULL;
        if (nc <= 2 && chosen[0] < SHARED && (nc == 1 || chosen[1] < SHARED))
            slot = &shared[chosen[0]][nc == 1 ? SHARED : chosen[1]];
        PyObject *one = slot != NULL ? *slot : NULL;
        if (one == NULL) {
            one = PyList_New(nc);
            if (one == NULL)
                goto done;
            for (int c = 0; c < nc; c++) {
                PyObject *sub = PyList_GET_ITEM(subs, chosen[c]);
                Py_INCREF(sub);
                PyList_SET_ITEM(one, c, sub);
            }
            if (slot != NULL) {
                *slot = one;  /* the table's reference, until the end */
                Py_INCREF(one);  /* and this packet's */
            }
        } else
            Py_INCREF(one);
        int r = PyList_Append(decided, one);
        Py_DECREF(one);
        if (r < 0)
            goto done;
        Py_ssize_t dlen = len + overhead;
        PyObject *d = PyLong_FromSsize_t(dlen);
        if (d == NULL)
            goto done;
        for (int c = 0; c < nc; c++) {
            int k = chosen[c];
            q[k] = (q[k] > 0.0 ? q[k] : 0.0) + (double)dlen;
            if (r == 0)
                r = PyList_Append(PyList_GET_ITEM(sizes, k), d);
        }
        Py_DECREF(d);
        if (r < 0)
            goto done;
        if (ucount[pk.urgent & 0xff]++ == 0)
            useen[nseen++] = (unsigned char)(pk.urgent & 0xff);
        copies += nc - 1;
        nbytes += (unsigned long long)len;
    }
    for (int u = 0; u < nseen; u++) {  /* urgs: {urgent bits: packets}, first seen first */
        PyObject *ko = PyLong_FromLong(useen[u]), *vo = PyLong_FromSsize_t(ucount[useen[u]]);
        int r = ko == NULL || vo == NULL ? -1 : PyDict_SetItem(urgs, ko, vo);
        Py_XDECREF(ko);
        Py_XDECREF(vo);
        if (r < 0)
            goto done;
    }
    result = Py_BuildValue("(nOOKndO)", i, decided, sizes, nbytes, copies, tokens, urgs);
done:
    for (int a = 0; a < SHARED; a++)
        for (int b = 0; b <= SHARED; b++)
            Py_XDECREF(shared[a][b]);
    Py_XDECREF(decided);
    Py_XDECREF(sizes);
    Py_XDECREF(urgs);
    return result;
}

/* add_seq(q, sizes, start) -> (q', total)
 *     LinkMeter.on_send_seq's loop: q + sizes[start] + sizes[start + 1] + ...
 *     added one at a time, in order (the same float rounding as one on_send
 *     each), and those sizes' sum.  ``sizes`` a list of ints. */
static PyObject *
add_seq(PyObject *self, PyObject *args)
{
    double q;
    PyObject *sizes;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "dO!n", &q, &PyList_Type, &sizes, &start))
        return NULL;
    long long total = 0;
    Py_ssize_t n = PyList_GET_SIZE(sizes);
    for (Py_ssize_t i = start < 0 ? 0 : start; i < n; i++) {
        long long v = PyLong_AsLongLong(PyList_GET_ITEM(sizes, i));
        if (v == -1 && PyErr_Occurred())
            return NULL;
        if (v < 0 || v > (1LL << 40)) {
            PyErr_SetString(PyExc_ValueError, "sizes must be datagram sizes");
            return NULL;
        }
        q += (double)v;
        total += v;
    }
    return Py_BuildValue("(dL)", q, total);
}

/* group_pairs(pairs, runs)
 *     Session.datagrams_by_member's loop: append each (member, datagram) of
 *     ``pairs`` (a sequence: the session's deque) to runs[member] (a new list for a member not there yet), in
 *     order.  Returns None. */
static PyObject *
group_pairs(PyObject *self, PyObject *args)
{
    PyObject *given, *runs;
    if (!PyArg_ParseTuple(args, "OO!", &given, &PyDict_Type, &runs))
        return NULL;
    PyObject *pairs = PySequence_Fast(given, "pairs must be a sequence");  /* a deque: copied */
    if (pairs == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(pairs);
    PyObject *lastm = NULL, *lastrun = NULL;  /* borrowed: the previous pair's member and run */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pr = PySequence_Fast_GET_ITEM(pairs, i);
        if (!PyTuple_Check(pr) || PyTuple_GET_SIZE(pr) != 2) {
            PyErr_SetString(PyExc_TypeError, "pairs must hold (member, datagram) tuples");
            goto fail;
        }
        PyObject *m = PyTuple_GET_ITEM(pr, 0), *d = PyTuple_GET_ITEM(pr, 1);
        PyObject *run = NULL;
        if (lastm != NULL && m == lastm)
            run = lastrun;
        else {
            run = PyDict_GetItemWithError(runs, m);
            if (run == NULL) {
                if (PyErr_Occurred())
                    goto fail;
                run = PyList_New(0);
                if (run == NULL)
                    goto fail;
                int r = PyDict_SetItem(runs, m, run);
                Py_DECREF(run);  /* the dict holds it */
                if (r < 0)
                    goto fail;
            }
            if (!PyList_Check(run)) {
                PyErr_SetString(PyExc_TypeError, "runs must map members to lists");
                goto fail;
            }
            lastm = m;
            lastrun = run;
        }
        if (PyList_Append(run, d) < 0)
            goto fail;
    }
    Py_DECREF(pairs);
    Py_RETURN_NONE;
fail:
    Py_DECREF(pairs);
    return NULL;
}

static PyMethodDef methods[] = {
    {"seal_dup", seal_dup, METH_VARARGS, "Seal packets once, one copy per member."},
    {"seal_each", seal_each, METH_VARARGS, "Seal packets once, one copy per subflow each has."},
    {"classify", (PyCFunction)(void (*)(void))classify, METH_VARARGS | METH_KEYWORDS, "(flow key, urgent bits) of one inner IP datagram."},
    {"open_run", open_run, METH_VARARGS, "Receive in-order or stale sealed DATA."},
    {"open_new", open_new, METH_VARARGS, "Open sealed DATA while the reorder buffer holds some."},
    {"reorder_push", reorder_push, METH_VARARGS, "ReorderBuffer.push_opened on the buffer's state."},
    {"nack_gaps", nack_gaps, METH_VARARGS, "NackReceiver.on_data_many's per-packet part."},
    {"receive_new", receive_new, METH_VARARGS, "open_new, reorder and NACK bookkeeping per datagram."},
    {"spread_run", spread_run, METH_VARARGS, "Scheduler.offer_many's spread case for a run of one flow."},
    {"urgent_run", urgent_run, METH_VARARGS, "Scheduler.offer_many's urgent case for a run of one flow."},
    {"add_seq", add_seq, METH_VARARGS, "LinkMeter.on_send_seq's loop: sizes added one at a time."},
    {"group_pairs", group_pairs, METH_VARARGS, "Session.datagrams_by_member's loop: pairs into runs per member."},
    {"split", split, METH_O, "Plain packets (complete checksums) of one vnet-hdr tun read."},
    {"coalesce", coalesce, METH_O, "Tun writes for packets, in-order TCP segments merged."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastpath", "SMPU duplicate-mode data path loops (optional).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    s_q = PyUnicode_InternFromString("q");
    s_t = PyUnicode_InternFromString("t");
    s_bw = PyUnicode_InternFromString("bw");
    s_bw0 = PyUnicode_InternFromString("bw0");
    if (s_q == NULL || s_t == NULL || s_bw == NULL || s_bw0 == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    /* the layout constants compiled in, for tests to compare with wire.py */
    if (PyModule_AddIntConstant(m, "HLEN", HLEN) < 0
            || PyModule_AddIntConstant(m, "TAG", TAG) < 0
            || PyModule_AddIntConstant(m, "OP_DATA", OP_DATA) < 0
            || PyModule_AddIntConstant(m, "F_SEALED", F_SEALED) < 0
            || PyModule_AddIntConstant(m, "VERSION", VERSION) < 0
            || PyModule_AddIntConstant(m, "OFF_VERSION", OFF_VERSION) < 0
            || PyModule_AddIntConstant(m, "OFF_OPCODE", OFF_OPCODE) < 0
            || PyModule_AddIntConstant(m, "OFF_MEMBER", OFF_MEMBER) < 0
            || PyModule_AddIntConstant(m, "OFF_FLAGS", OFF_FLAGS) < 0
            || PyModule_AddIntConstant(m, "OFF_SESSION", OFF_SESSION) < 0
            || PyModule_AddIntConstant(m, "OFF_LENGTH", OFF_LENGTH) < 0
            || PyModule_AddIntConstant(m, "OFF_EPOCH", OFF_EPOCH) < 0
            || PyModule_AddIntConstant(m, "OFF_RESERVED", OFF_RESERVED) < 0
            || PyModule_AddIntConstant(m, "OFF_SEQ", OFF_SEQ) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
