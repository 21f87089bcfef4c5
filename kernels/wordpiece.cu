// BERT WordPiece on ASCII text, one thread per input byte. CPU reference:
// `model::wordpiece::WordPieceTable::word_at` (same byte classes, hash and greedy match).
//
// Input: texts concatenated, separated by a space (so no word crosses two texts). The thread
// of byte i writes the tokens of the word that starts at i to ids[i], ids[i+1], ... (a word
// never has more tokens than bytes) and their number to counts[i] (0 where no word starts);
// the host concatenates them in byte order.
//
// Vocabulary: slots (power of two, entry index + 1, 0 = empty; linear probing), entries
// (offset, len | continuation << 31, id) into vocab_bytes; FNV-1a seeded by continuation.
// max_piece: the longest vocabulary piece, where the greedy match starts.

#define LETTER 0
#define SPACE 1
#define PUNCT 2
#define REMOVED 3
#define MAX_WORD 255

__device__ __forceinline__ int byte_class(unsigned char b) {
    if (b == ' ' || b == '\t' || b == '\n' || b == '\r') return SPACE;
    if (b < 0x20 || b == 0x7f) return REMOVED;
    if ((b >= '!' && b <= '/') || (b >= ':' && b <= '@') || (b >= '[' && b <= '`') ||
        (b >= '{' && b <= '~'))
        return PUNCT;
    return LETTER;
}

__device__ unsigned lookup(const unsigned char* piece, int len, bool cont, const unsigned* slots,
                           unsigned mask, const unsigned* entries,
                           const unsigned char* vocab_bytes) {
    unsigned h = 0x811c9dc5u ^ (cont ? 0x5bd1e995u : 0u);
    for (int i = 0; i < len; i++) {
        h ^= piece[i];
        h *= 0x01000193u;
    }
    for (unsigned s = h & mask;; s = (s + 1) & mask) {
        const unsigned e = slots[s];
        if (e == 0) return 0xffffffffu;
        const unsigned* ent = entries + 3 * (size_t)(e - 1);
        const unsigned elen = ent[1] & 0x7fffffffu;
        if ((ent[1] >> 31) != (cont ? 1u : 0u) || elen != (unsigned)len) continue;
        const unsigned char* v = vocab_bytes + ent[0];
        bool same = true;
        for (int i = 0; i < len && same; i++) same = v[i] == piece[i];
        if (same) return ent[2];
    }
}

extern "C" __global__ void wordpiece_ascii(const unsigned char* text, unsigned long long n,
                                           const unsigned* slots, unsigned mask,
                                           const unsigned* entries,
                                           const unsigned char* vocab_bytes, unsigned unk,
                                           int max_chars, int max_piece, unsigned* ids,
                                           unsigned char* counts) {
    const unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int c = byte_class(text[i]);
    if (c == PUNCT) {
        const unsigned id = lookup(text + i, 1, false, slots, mask, entries, vocab_bytes);
        ids[i] = id == 0xffffffffu ? unk : id;
        counts[i] = 1;
        return;
    }
    if (c != LETTER) {
        counts[i] = 0;
        return;
    }
    // A word starts here unless the previous kept byte is a letter.
    for (long long j = (long long)i - 1; j >= 0; j--) {
        const int pc = byte_class(text[j]);
        if (pc == REMOVED) continue;
        if (pc == LETTER) {
            counts[i] = 0;
            return;
        }
        break;
    }
    unsigned char w[MAX_WORD];
    int len = 0, chars = 0;
    for (unsigned long long j = i; j < n; j++) {
        const unsigned char b = text[j];
        const int bc = byte_class(b);
        if (bc == REMOVED) continue;
        if (bc != LETTER) break;
        chars++;
        if (chars <= max_chars) w[len++] = (b >= 'A' && b <= 'Z') ? b + 32 : b;
    }
    if (chars > max_chars) {
        ids[i] = unk;
        counts[i] = 1;
        return;
    }
    int out = 0, start = 0;
    while (start < len) {
        // No piece is longer than max_piece bytes: longer candidates cannot match.
        int end = min(len, start + max_piece);
        unsigned id = 0xffffffffu;
        for (; end > start; end--) {
            id = lookup(w + start, end - start, start > 0, slots, mask, entries, vocab_bytes);
            if (id != 0xffffffffu) break;
        }
        if (id == 0xffffffffu) {
            ids[i] = unk;
            counts[i] = 1;
            return;
        }
        ids[i + out++] = id;
        start = end;
    }
    counts[i] = (unsigned char)out;
}
